import contextlib

import pytest
import torch

from audiodiff import devices, models
from audiodiff.errors import AudiodiffError


@pytest.fixture
def fp32_flags():
    """torch's CUDA defaults (convolutions as TF32) before the test, whatever they were restored after it."""
    matmul, conv = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = "tf32", "tf32"
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = matmul, conv


def test_tf32_is_off_wherever_a_device_is_set_up_unless_asked_for_and_only_on_gpus(fp32_flags):
    devices.for_inference(models.new_model("tiny").unet, torch.device("cpu"), "bf16")
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("ieee", "ieee")
    devices.set_fp32_precision("tf32")
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("tf32", "tf32")
    assert isinstance(devices.autocast(torch.device("cuda"), "tf32"), contextlib.nullcontext)  # fp32 weights and ops
    devices.check_precision("tf32", gpu=True)
    with pytest.raises(AudiodiffError, match="--precision tf32 is a GPU format"):
        devices.check_precision("tf32", gpu=False)


@pytest.fixture
def ray_assigned(monkeypatch):
    """A process Ray gave GPU 3, with the driver nvidia-smi would name."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [3])
    monkeypatch.setattr(devices, "nvidia_driver", lambda: "535.104.05")
    return monkeypatch


def test_gpu_preflight_refuses_a_gpu_torch_cannot_see_and_names_driver_cuda_and_gpu(ray_assigned):
    ray_assigned.setattr(torch.cuda, "is_available", lambda: False)
    ray_assigned.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(AudiodiffError, match=r"finetune worker 1: Ray assigned GPU \[3\], but torch .* \(CUDA 13.0\) "
                                             r"cannot use it: NVIDIA driver 535.104.05, and CUDA 13.0 needs driver R580"):
        devices.check_gpu_visible("finetune worker 1")
    ray_assigned.setattr(torch.version, "cuda", None)
    with pytest.raises(AudiodiffError, match="is a CPU-only build"):
        devices.check_gpu_visible("generate actor")
    ray_assigned.setattr(torch.version, "cuda", "13.0")
    ray_assigned.setattr(torch.cuda, "is_available", lambda: True)
    ray_assigned.setattr(torch.cuda, "current_device", lambda: 0)
    ray_assigned.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H200")
    line = devices.check_gpu_visible("finetune worker 0")
    assert line.startswith("finetune worker 0: GPU [3] is cuda:0, NVIDIA H200, NVIDIA driver 535.104.05, torch ")
    assert line.endswith("(CUDA 13.0)")
    ray_assigned.setattr("ray.get_gpu_ids", lambda: [])
    assert devices.check_gpu_visible("a CPU worker") is None

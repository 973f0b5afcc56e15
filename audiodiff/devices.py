"""Where a model runs and how: the floating-point precision (`auto` resolved per device), the autocast
context that applies it, the memory layout of a model for inference, the CPU threads of a Ray worker and the
pre-flight of a GPU worker (check_gpu_visible). One small module, so that generate, the audio-to-audio
commands and finetune make these choices alike.

`fp32` runs the model as stored; `bf16` and `fp16` run it under `torch.autocast` (weights, the sampler's updates
and the loss stay fp32). `auto` is bf16 with --gpu, and on CPU bf16 only where the driver's CPU computes it
natively (emulated bf16 is slower than fp32: BENCHMARKS.md, "Precision"). The driver resolves it once, because a
clip is a pure function of its precision and `generation.json` records it. `fp32` means IEEE fp32 on GPUs too
(set_fp32_precision turns torch's default TF32 off); `tf32` asks for TF32. Interpolation defaults to fp32 since
DDIM inversion amplifies bf16's rounding (tests/test_precision.py states the tolerances).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import platform
import subprocess

import torch

from audiodiff.errors import AudiodiffError

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "tf32")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}
# The oldest NVIDIA driver branch that runs each CUDA major version (minor-version compatibility): torch 2.11's
# default wheel is CUDA 13.0, which needs R580.
DRIVER_FOR_CUDA = {"11": 450, "12": 525, "13": 580}
log = logging.getLogger(__name__)


@functools.cache
def native_bf16_cpu() -> bool:
    """Whether this machine's CPU has bf16 instructions (Linux x86's /proc/cpuinfo flags). Elsewhere (ARM,
    macOS) bf16 on CPU has not been measured faster than fp32, so this says no."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool(_NATIVE_BF16_FLAGS & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def resolve_precision(precision: str, gpu: bool) -> str:
    """`auto` -> the precision this run uses (see the module's docstring); any other name is returned as it is
    (check_precision judges it)."""
    if precision != "auto":
        return precision
    return "bf16" if gpu or native_bf16_cpu() else "fp32"


def check_precision(precision: str, gpu: bool, flag: str = "--precision") -> None:
    """Refuses an unknown precision, and fp16 on CPU: CPUs without fp16 arithmetic (all but the newest Intel
    ones) emulate it, 4.5x slower than fp32 on the tiny model here (measured), for nothing gained."""
    if precision not in PRECISIONS:
        raise AudiodiffError(f"{flag} must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if precision == "fp16" and not gpu:
        raise AudiodiffError(f"{flag} fp16 runs on GPUs only (with --gpu); on CPU use bf16 (fast where the CPU has "
                             "native bf16) or fp32")
    if precision == "tf32" and not gpu:
        raise AudiodiffError(f"{flag} tf32 is a GPU format (with --gpu); on CPU use fp32 or bf16")


def set_fp32_precision(precision: str) -> None:
    """What fp32 matmuls and convolutions on CUDA compute in this process: TF32 for `tf32`, IEEE fp32 otherwise
    (torch's own default runs convolutions as TF32). Under autocast it governs the ops autocast leaves in fp32."""
    mode = "tf32" if precision == "tf32" else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The context to run the model's forward pass in: autocast to `precision`, or nothing for fp32. The
    backward pass and a loss belong outside it."""
    if precision in ("fp32", "tf32"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def for_inference(unet: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
    """The model on `device` in eval mode and in the memory layout that is faster there: channels-last on CPU
    (the tiny UNet's step 5 to 15% faster in fp32 and in bf16 at batch 1 and 8, and emulated bf16 13x faster,
    measured; inputs stay NCHW, convolutions take them as they are). On CUDA it is left as it is until measured."""
    set_fp32_precision(precision)
    unet = unet.to(device).eval()
    if device.type == "cpu":
        unet = unet.to(memory_format=torch.channels_last)
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        log.warning("%s has no native bf16: --precision bf16 (the default with --gpu) runs slower there than "
                    "--precision fp16 or fp32", torch.cuda.get_device_name(device))
    return unet


def use_cpus_given() -> int | None:
    """In a Ray task or actor: make torch use as many threads as the CPUs Ray gave it (at least one), whatever
    OMP_NUM_THREADS the worker inherited. Returns the threads, or None outside a Ray worker (left as it is)."""
    import ray

    if not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:
        return None
    threads = max(1, math.floor(context.get_assigned_resources().get("CPU", 1)))
    torch.set_num_threads(threads)
    return threads


def nvidia_driver() -> str | None:
    """The NVIDIA driver's version as nvidia-smi reports it (it answers where torch cannot use the driver), or
    None where there is no nvidia-smi."""
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    versions = result.stdout.split()
    return versions[0] if result.returncode == 0 and versions else None


def check_gpu_visible(asked_by: str) -> str | None:
    """Pre-flight of a Ray worker or actor: None where Ray assigned it no GPU; else one line naming the GPU, the
    driver and torch's CUDA, or an AudiodiffError when torch cannot see the GPU Ray assigned (a driver too old for
    torch's CUDA build, or a CPU-only torch), before NCCL or `.to("cuda")` fail less clearly."""
    import ray

    assigned = ray.get_gpu_ids() if ray.is_initialized() else []
    if not assigned:
        return None
    driver = nvidia_driver()
    cuda = torch.version.cuda
    if not torch.cuda.is_available():
        if cuda is None:
            raise AudiodiffError(f"{asked_by}: Ray assigned GPU {assigned}, but torch {torch.__version__} is a "
                                 "CPU-only build; install a CUDA build of torch in the workers' environment")
        needed = DRIVER_FOR_CUDA.get(cuda.split(".")[0])
        raise AudiodiffError(
            f"{asked_by}: Ray assigned GPU {assigned}, but torch {torch.__version__} (CUDA {cuda}) cannot use it: "
            f"NVIDIA driver {driver or 'not found (no nvidia-smi)'}"
            + (f", and CUDA {cuda} needs driver R{needed} or newer" if needed else "")
            + "; update the node's driver or install a torch built for an older CUDA")
    device = torch.cuda.current_device()
    return (f"{asked_by}: GPU {assigned} is cuda:{device}, {torch.cuda.get_device_name(device)}, "
            f"NVIDIA driver {driver or 'unknown'}, torch {torch.__version__} (CUDA {cuda})")


def cpu_name() -> str:
    """The CPU's model name (Linux), else what the platform reports."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()

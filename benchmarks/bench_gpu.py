"""Every GPU figure of audiodiff in one run of at most 9 minutes on one GPU, one JSON line per measurement.

    python benchmarks/bench_gpu.py [--out FILE.jsonl] [--budget-s 480] [--peak-tflops N] [--smoke]

Each line is written (and flushed to --out) as soon as its measurement ends, so a run cut off keeps what it
measured; measurements are in order of importance and those left when --budget-s has passed are skipped (a
line saying so). The model is the full preset (teticio's audio-diffusion-256 UNet, untrained: speed does not
depend on the weights) in bf16 autocast, as generate runs it on GPUs.
- machine: GPU, torch, CUDA, bf16 peak (a table of dense bf16 tensor-core peaks, or --peak-tflops), TF32 flags.
- unet_forward: the UNet's forward per batch size at 256x256 and 256x1024: ms, TFLOP/s, model FLOP utilisation
  (FLOPs counted by torch.utils.flop_counter.FlopCounterMode on a meta-device copy: no GPU time), memory per clip
  (peak allocated less the weights) beside audiodiff's estimate (audiodiff.unets.clip_bytes, which sizes batches).
- ddim50: clips/s of DDIM-50 end to end (audiodiff.sampling's loop, the UNet, Griffin-Lim on the GPU).
- ddpm_overhead: DDPM's time per step beyond the UNet's forward (the scheduler's update, its noise draws).
- griffin_lim: ms per clip of audiodiff.mel's batched Griffin-Lim.
- train_step: images/s and utilisation of a training step (forward in autocast, backward, AdamW).
- diffusers_pipeline: diffusers' AudioDiffusionPipeline on the same GPU and UNet (fp32, as the notebook runs it),
  DDIM-50 per clip, its librosa Griffin-Lim timed apart where librosa is installed; and the ratio to ddim50.
--smoke: the same on CPU with the tiny preset, few steps and small batches, in well under a minute (the tests
run it). On CPU memory and utilisation are null.

It imports from audiodiff only modules that need no Ray and no pyarrow (unets, sampling, mel, devices), so
it runs on a GPU machine that has CUDA torch and nothing else, given these 27 wheels: 39.5 MiB (numpy 16.9 and
Pillow 7.1 of it, which such machines often have; diffusers 6.4, hf-xet 4.3, torchaudio 1.8), downloaded with
the versions of the project's environment (Python 3.11; change --python-version to the GPU machine's):
    pip download --no-deps --only-binary :all: --python-version 3.11 -d wheels --platform manylinux_2_28_x86_64 \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 diffusers==0.42.1 huggingface_hub==2.4.0 \\
        hf-xet==1.8.0 httpx2==2.16.2 httpcore2==2.16.2 h11==0.16.0 anyio==4.16.0 idna==3.20 truststore==0.10.5 \\
        certifi==2026.10.19.post1 click==8.5.1 filelock==4.3.2 fsspec==2026.9.0 packaging==26.4 PyYAML==6.0.4 \\
        tqdm==4.70.1 typing_extensions==4.16.0 importlib_metadata==10.2.0 zipp==4.1.2 regex==2026.11.19 \\
        requests==2.34.2 urllib3==2.8.0 charset_normalizer==3.5.3 safetensors==0.8.0 numpy==2.4.6 pillow==13.0.0 \\
        torchaudio==2.11.0
    # there: pip install --no-index --no-deps wheels/*.whl (leave out what it has; torchaudio must match its torch:
    # without it the Griffin-Lim figures are skipped, with a line saying so)
librosa (for the pipeline's own Griffin-Lim) brings numba, llvmlite and scipy, over 64 MiB: left out, the
pipeline's denoising is timed alone.
"""

import argparse
import copy
import json
import math
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # audiodiff without installing it

from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

from audiodiff import devices, sampling  # noqa: E402
from audiodiff.unets import clip_bytes, full_unet, tiny_unet  # noqa: E402

# dense bf16 tensor-core peaks, TFLOP/s (NVIDIA's data sheets; the sparse figures are twice these)
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.5, "H100 NVL": 835.5,
                    "A100": 312.0, "L40S": 362.1, "L4": 121.0}
FULL = {"unet": full_unet, "height": 256, "widths": (256, 1024), "batches": {256: (1, 8, 32, 64), 1024: (1, 4, 16)},
        "steps": 50, "clips": 32, "train_batch": 16, "reference_clips": 8, "precision": "bf16"}
SMOKE = {"unet": tiny_unet, "height": 64, "widths": (64, 256), "batches": {64: (1, 2), 256: (1,)},
         "steps": 3, "clips": 2, "train_batch": 2, "reference_clips": 1, "precision": "fp32"}


class Run:
    """The device, the setting, the deadline and where the JSON lines go."""

    def __init__(self, args):
        self.setting = SMOKE if args.smoke else FULL
        self.device = torch.device("cpu" if args.smoke else "cuda")
        self.precision = self.setting["precision"]
        self.deadline = time.monotonic() + args.budget_s
        self.out = open(args.out, "a") if args.out else None
        self.peak = args.peak_tflops * 1e12 if args.peak_tflops else None
        self.results: dict[str, dict] = {}
        self.least_s = 0.0 if args.smoke else 1.0  # the smoke run times two calls of each thing: it checks, not measures

    def emit(self, what: str, **figures) -> dict:
        line = {"what": what, **figures}
        text = json.dumps(line)
        print(text, flush=True)
        if self.out:
            self.out.write(text + "\n")
            self.out.flush()
            os.fsync(self.out.fileno())
        return line

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def seconds(self, call, least_s: float = 1.0) -> float:
        """Seconds per call after a warm-up call: as many calls as fill `least_s`, synchronised once."""
        call()
        self.sync()
        start = time.perf_counter()
        call()
        self.sync()
        once = time.perf_counter() - start
        repeats = max(1, min(50, math.ceil(least_s * self.least_s / max(once, 1e-6)) - 1))
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        self.sync()
        return (time.perf_counter() - start + once) / (repeats + 1)

    def utilisation(self, flops: float, seconds: float) -> float | None:
        return flops / seconds / self.peak if self.peak else None

    def autocast(self):
        return devices.autocast(self.device, self.precision)


def counted_flops(unet, batch: int, height: int, width: int, backward: bool = False) -> int:
    """FLOPs of one forward (and backward) of `unet` at this size, counted on a meta-device copy."""
    with torch.device("meta"):
        meta = type(unet).from_config(unet.config)
    x, t = torch.randn(batch, 1, height, width, device="meta"), torch.full((batch,), 10, device="meta")
    with FlopCounterMode(display=False) as counter:
        out = meta(x, t).sample
        if backward:
            out.sum().backward()
    return counter.get_total_flops()


def machine(run: Run) -> None:
    name = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "cpu"
    if run.peak is None and run.device.type == "cuda":
        run.peak = next((tflops * 1e12 for key, tflops in BF16_PEAK_TFLOPS.items() if key in name), None)
    run.emit("machine", device=name, torch=torch.__version__, cuda=torch.version.cuda,
             memory_gib=torch.cuda.get_device_properties(run.device).total_memory / 2 ** 30
             if run.device.type == "cuda" else None, bf16_peak_tflops=run.peak / 1e12 if run.peak else None,
             fp32_matmul=torch.backends.cuda.matmul.fp32_precision, fp32_conv=torch.backends.cudnn.conv.fp32_precision,
             precision=run.precision)


def unet_forward(run: Run, unet, width: int) -> None:
    height = run.setting["height"]
    for batch in run.setting["batches"][width]:
        if time.monotonic() > run.deadline:
            run.emit("unet_forward", width=width, batch=batch, skipped="time budget")
            continue
        x, t = torch.randn(batch, 1, height, width, device=run.device), torch.full((batch,), 10, device=run.device)
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(run.device)
            weights = torch.cuda.memory_allocated(run.device)
        with torch.no_grad(), run.autocast():
            seconds = run.seconds(lambda: unet(x, t))
        flops = counted_flops(unet, batch, height, width)
        measured = ((torch.cuda.max_memory_allocated(run.device) - weights) / batch
                    if run.device.type == "cuda" else None)
        run.results[f"forward-{width}-{batch}"] = run.emit(
            "unet_forward", width=width, batch=batch, ms=seconds * 1e3, ms_per_clip=seconds * 1e3 / batch,
            gflop_per_clip=flops / batch / 1e9, tflops=flops / seconds / 1e12,
            utilisation=run.utilisation(flops, seconds), memory_mib_per_clip=measured / 2 ** 20 if measured else None,
            estimate_mib_per_clip=clip_bytes(unet, None, height, width, run.precision) / 2 ** 20)


def codec(run: Run):
    """audiodiff's mel codec on the device, or None where torchaudio is missing."""
    try:
        from audiodiff.mel import MelCodec, MelConfig
    except ImportError as e:
        run.emit("griffin_lim", skipped=f"audiodiff.mel cannot be imported: {e}")
        return None
    size = run.setting["height"]
    return MelCodec(MelConfig(x_res=size, y_res=size), device=run.device)


def ddim50(run: Run, unet, mel) -> None:
    s = run.setting
    scheduler = DDIMScheduler.from_config(DDPMScheduler(num_train_timesteps=1000).config)

    def clips():
        generators = [torch.Generator().manual_seed(seed) for seed in range(s["clips"])]
        with run.autocast():
            images = sampling.sample(unet, scheduler, generators, s["height"], s["height"], s["steps"])
        return mel.images_to_audio(images) if mel is not None else images

    seconds = run.seconds(clips, least_s=0)
    run.results["ddim"] = run.emit("ddim50", steps=s["steps"], batch=s["clips"], clips_per_s=s["clips"] / seconds,
                                   ms_per_clip=seconds * 1e3 / s["clips"], griffin_lim_included=mel is not None)


def ddpm_overhead(run: Run, unet) -> None:
    s = run.setting
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    generators = [torch.Generator().manual_seed(seed) for seed in range(s["clips"])]
    x = torch.randn(s["clips"], 1, s["height"], s["height"], device=run.device)
    t = torch.full((s["clips"],), 10, device=run.device)
    with torch.no_grad(), run.autocast():
        forward = run.seconds(lambda: unet(x, t), least_s=0.5)
        whole = run.seconds(lambda: sampling.sample(unet, scheduler, generators, s["height"], s["height"], s["steps"]),
                            least_s=0)
    run.emit("ddpm_overhead", steps=s["steps"], batch=s["clips"], ms_per_step=whole * 1e3 / s["steps"],
             unet_ms_per_step=forward * 1e3, overhead_ms_per_step=(whole / s["steps"] - forward) * 1e3)


def griffin_lim(run: Run, mel) -> None:
    s = run.setting
    images = torch.randint(0, 256, (s["clips"], s["height"], s["height"]), dtype=torch.uint8, device=run.device)
    seconds = run.seconds(lambda: mel.images_to_audio(images), least_s=0.5)
    run.emit("griffin_lim", batch=s["clips"], ms_per_clip=seconds * 1e3 / s["clips"])


def train_step(run: Run, unet) -> None:
    s = run.setting
    model = copy.deepcopy(unet).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as finetune's
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    batch, size = s["train_batch"], s["height"]
    clean = torch.rand(batch, 1, size, size, device=run.device) * 2 - 1

    def step():
        noise = torch.randn_like(clean)
        t = torch.randint(0, 1000, (batch,), device=run.device)
        with run.autocast():
            prediction = model(scheduler.add_noise(clean, noise, t), t).sample
        torch.nn.functional.mse_loss(prediction.float(), noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = run.seconds(step)
    flops = counted_flops(unet, batch, size, size, backward=True)
    run.emit("train_step", batch=batch, ms=seconds * 1e3, images_per_s=batch / seconds, tflops=flops / seconds / 1e12,
             utilisation=run.utilisation(flops, seconds))
    del model, optimizer


def diffusers_pipeline(run: Run, unet) -> None:
    """diffusers' own pipeline, fp32 as the notebook runs it, on the same device; its Griffin-Lim (librosa, on
    the CPU, one clip at a time) timed apart."""
    try:
        from diffusers.pipelines.deprecated.audio_diffusion import AudioDiffusionPipeline, Mel
    except ImportError as e:
        run.emit("diffusers_pipeline", skipped=f"no AudioDiffusionPipeline in this diffusers: {e}")
        return
    s = run.setting
    mel = Mel(x_res=s["height"], y_res=s["height"])
    scheduler = DDIMScheduler.from_config(DDPMScheduler(num_train_timesteps=1000).config)
    pipe = AudioDiffusionPipeline(vqvae=None, unet=copy.deepcopy(unet).float(), mel=mel, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    try:
        import librosa  # noqa: F401
        image = torch.randint(0, 256, (s["height"], s["height"]), dtype=torch.uint8).numpy()
        from PIL import Image
        griffin = run.seconds(lambda: mel.image_to_audio(Image.fromarray(image)), least_s=0.5)
    except ImportError:
        griffin = None
    mel.image_to_audio = lambda image: image  # the denoising alone: its Griffin-Lim is timed above
    batch = s["reference_clips"]
    seconds = run.seconds(lambda: pipe(batch_size=batch, steps=s["steps"],
                                       generator=torch.Generator(run.device).manual_seed(0)), least_s=0)
    per_clip = seconds / batch + (griffin or 0)
    ours = run.results.get("ddim")
    run.emit("diffusers_pipeline", steps=s["steps"], batch=batch, denoising_ms_per_clip=seconds * 1e3 / batch,
             librosa_griffin_lim_ms_per_clip=griffin * 1e3 if griffin is not None else None,
             ms_per_clip=per_clip * 1e3, audiodiff_speedup=per_clip * 1e3 / ours["ms_per_clip"] if ours else None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also append each JSON line to this file (flushed line by line)")
    parser.add_argument("--budget-s", type=float, default=480, help="skip what is left after this many seconds")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: from a table)")
    parser.add_argument("--smoke", action="store_true", help="on CPU with the tiny preset, in seconds")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench_gpu: torch sees no GPU (torch.cuda.is_available() is False); --smoke runs on CPU", file=sys.stderr)
        return 1
    run = Run(args)
    torch.manual_seed(0)
    unet = devices.for_inference(run.setting["unet"](), run.device, run.precision)
    machine(run)
    mel = codec(run)
    steps = [lambda: unet_forward(run, unet, run.setting["widths"][0]), lambda: ddim50(run, unet, mel),
             lambda: griffin_lim(run, mel) if mel is not None else None,
             lambda: unet_forward(run, unet, run.setting["widths"][1]), lambda: ddpm_overhead(run, unet),
             lambda: train_step(run, unet), lambda: diffusers_pipeline(run, unet)]
    names = ["unet_forward", "ddim50", "griffin_lim", "unet_forward", "ddpm_overhead", "train_step",
             "diffusers_pipeline"]
    for name, measure in zip(names, steps):
        if time.monotonic() > run.deadline:
            run.emit(name, skipped="time budget")
            continue
        try:
            measure()
        except torch.OutOfMemoryError as e:
            run.emit(name, skipped=f"out of memory: {str(e).splitlines()[0]}")
            torch.cuda.empty_cache()
    run.emit("done", seconds=args.budget_s - (run.deadline - time.monotonic()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

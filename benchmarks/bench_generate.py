"""Generation throughput: diffusers' AudioDiffusionPipeline called as the notebook does against this job, in
steady state, by precision, actors and batch size; and where the time of one clip goes.

    python benchmarks/bench_generate.py [--model tiny] [--steps 50] [--batch-size 8] [--precisions auto,fp32]
                                        [--actors 1,2] [--long 3] [--repeats 2] [--unet] [--compile]

Steady state: every figure is the difference of two runs of different lengths (clips/s = extra clips / extra
seconds), so what a run spends once (Ray Data planning, actors starting, importing torch and loading the model,
the notebook's first call) cancels out. The short run gives every actor one batch, the long one `--long`; each
length runs `--repeats` times and its fastest run counts. Run it on a quiet machine: on a busy one start-up
varies by more than the work (the figure then reads "not measurable").
notebook: one clip per `pipe(steps=..., generator=...)` call (DDIM, librosa Griffin-Lim inside), WAV written,
fp32 with torch's default threads (all the machine's CPUs).
audiodiff: `run_generate` on a local Ray (DDIM, same steps), WAV + PNG + manifest written; each CPU actor gets
ACTOR_CPUS of Ray's CPUs and uses one thread per whole CPU given (at least one).
--unet: the UNet's forward pass per clip and step in one process by precision, memory layout, batch size and
threads (best of several repeats: robust to a busy machine). --compile: torch.compile's compile time and its
step time against eager, with the break-even number of steps.
The model is untrained (speed does not depend on the weights). The last line is one JSON object.
"""

import argparse
import json
import os
import shutil
import tempfile
import time

import ray
import soundfile
import torch
from diffusers import AudioDiffusionPipeline, DDIMScheduler, Mel
from torch.utils.flop_counter import FlopCounterMode

from audiodiff import devices, models, sampling
from audiodiff.clips import ClipMaker
from audiodiff.encode import png_bytes, wav_bytes
from audiodiff.generate import GenerateConfig, run_generate
from audiodiff.runtime import init_ray
from audiodiff.devices import cpu_name



def steady_rate(run, short: int, long: int, repeats: int) -> tuple[float | None, float, float]:
    """(clips/s in steady state, seconds of the short run, seconds of the long run); `run(n)` makes n clips. Each
    length runs `repeats` times, short and long in turn, and counts its fastest run. None where the long run was
    not the slower: start-up varied by more than the extra clips took (a busy machine; lengthen the long run)."""
    times = {short: float("inf"), long: float("inf")}
    for _ in range(repeats):
        for n in (short, long):
            start = time.perf_counter()
            run(n)
            times[n] = min(times[n], time.perf_counter() - start)
    extra = times[long] - times[short]
    return ((long - short) / extra if extra > 0 else None), times[short], times[long]


def notebook(folder: str, steps: int, out: str, short: int, long: int, repeats: int) -> float | None:
    parts = models.load_model(folder)
    pipe = AudioDiffusionPipeline(vqvae=None, unet=parts.unet, mel=Mel(**vars(parts.mel)),
                                  scheduler=DDIMScheduler.from_config(parts.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    pipe(steps=2)  # warm-up

    def run(clips):
        for i in range(clips):
            output = pipe(steps=steps, generator=torch.Generator().manual_seed(i))
            soundfile.write(os.path.join(out, f"{i}.wav"), output.audios[0, 0], parts.mel.sample_rate)

    return steady_rate(run, short, long, repeats)[0]


def job(folder: str, work: str, steps: int, batch_size: int, actors: int, precision: str, long: int,
        repeats: int) -> dict:
    """The generate job's steady rate: one batch per actor, then `long` batches per actor."""
    runs = iter(range(1000))

    def run(clips):
        config = GenerateConfig(model=folder, output=os.path.join(work, f"out-{precision}-{actors}-{next(runs)}"),
                                num_clips=clips, scheduler="ddim", steps=steps, batch_size=batch_size,
                                concurrency=actors, precision=precision)
        run_generate(config)

    per_round = batch_size * actors
    rate, short_s, _ = steady_rate(run, per_round, long * per_round, repeats)
    return {"clips_per_s": rate, "start_up_s": short_s - per_round / rate if rate else None}


def breakdown(folder: str, work: str, steps: int, batch_size: int, precision: str) -> dict[str, float]:
    """Where one actor's time goes per clip, in this process (threads as set by the caller)."""
    config = GenerateConfig(model=folder, output=work, scheduler="ddim", steps=steps, precision=precision)
    maker = ClipMaker(config)
    generators = [torch.Generator().manual_seed(seed) for seed in range(batch_size)]
    mel = maker.codec.config
    start = time.perf_counter()
    with devices.autocast(maker.device, config.precision):
        images = sampling.sample(maker.unet, maker.scheduler, generators, mel.y_res, mel.x_res, config.num_steps)
    t1 = time.perf_counter()
    audio = maker.codec.images_to_audio(images).numpy()
    t2 = time.perf_counter()
    encoded = [(wav_bytes(a, mel.sample_rate), png_bytes(i)) for a, i in zip(audio, images.numpy())]
    t3 = time.perf_counter()
    for n, (wav, png) in enumerate(encoded):
        for data, ext in ((wav, "wav"), (png, "png")):
            with open(os.path.join(work, f"b{n}.{ext}"), "wb") as f:
                f.write(data)
    t4 = time.perf_counter()
    return {k: v / batch_size for k, v in
            zip(("denoising", "griffin-lim", "encoding", "writing"), (t1 - start, t2 - t1, t3 - t2, t4 - t3))}


def step_ms(unet, batch: int, height: int, width: int, precision: str, repeats: int = 5, calls: int = 4) -> float:
    """The UNet's forward pass per clip, best of `repeats` means of `calls` passes."""
    sample, t = torch.randn(batch, 1, height, width), torch.tensor([500])
    best = float("inf")
    with torch.no_grad(), devices.autocast(torch.device("cpu"), precision):
        unet(sample, t)  # warm-up (oneDNN primitives, caches)
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                unet(sample, t)
            best = min(best, (time.perf_counter() - start) / calls / batch)
    return best * 1000


def unet_table(folder: str, precisions: list[str], batches: list[int], threads: list[int]) -> dict[str, float]:
    parts = models.load_model(folder)
    height, width = parts.image_size
    layouts = {"nchw": parts.unet.eval(), "channels_last": models.load_model(folder).unet.eval().to(
        memory_format=torch.channels_last)}
    figures = {}
    for n in threads:
        torch.set_num_threads(n)
        for batch in batches:
            line = []
            for precision in precisions:
                for layout, unet in layouts.items():
                    ms = step_ms(unet, batch, height, width, precision)
                    figures[f"unet_ms_{precision}_{layout}_b{batch}_t{n}"] = ms
                    line.append(f"{precision} {layout} {ms:6.2f}")
            print(f"  UNet per clip-step, batch {batch:2d}, {n} thread{'s' if n > 1 else ' '}: " + ", ".join(
                f"{x} ms" for x in line), flush=True)
    return figures


def compile_check(folder: str, precision: str, batch: int, threads: int) -> dict[str, float]:
    """torch.compile (inductor) against eager, channels-last, in `precision`: compile time with an empty cache (what
    an actor on a fresh node pays), per-step times and how many denoising steps of one batch repay the compile."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-inductor-")  # read at each compile
    torch.set_num_threads(threads)
    parts = models.load_model(folder)
    height, width = parts.image_size
    unet = parts.unet.eval().to(memory_format=torch.channels_last)
    eager = step_ms(unet, batch, height, width, precision)
    compiled = torch.compile(unet)
    sample, t = torch.randn(batch, 1, height, width), torch.tensor([500])
    start = time.perf_counter()
    with torch.no_grad(), devices.autocast(torch.device("cpu"), precision):
        compiled(sample, t)
    compile_s = time.perf_counter() - start
    fast = step_ms(compiled, batch, height, width, precision)
    gain_per_step_s = (eager - fast) * batch / 1000
    return {"compile_s": compile_s, "eager_ms": eager, "compiled_ms": fast,
            "break_even_steps": compile_s / gain_per_step_s if gain_per_step_s > 0 else float("inf")}


def rate_text(rate: float | None) -> str:
    return f"{rate:7.3f} clips/s" if rate else "not measurable (start-up varied more than the extra clips took)"


def forward_flops(unet, height: int, width: int) -> float:
    """One denoising step of one clip, counted by torch: what sizes a run on hardware not measured."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(torch.randn(1, 1, height, width), torch.tensor([0]))
    return counter.get_total_flops()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="a preset or model folder")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precisions", default="auto,fp32", help="of the job runs (auto: what generate resolves)")
    parser.add_argument("--actors", default="1,2")
    parser.add_argument("--long", type=int, default=3, help="batches per actor in the long run (the short: 1)")
    parser.add_argument("--notebook-clips", default="4,12", help="the notebook's short and long run")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each length; the fastest counts")
    parser.add_argument("--unet", action="store_true", help="also the UNet step table (precision, layout, batch)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile's cost and gain")
    args = parser.parse_args()
    machine_threads = torch.get_num_threads()
    auto = devices.resolve_precision("auto", gpu=False)
    precisions = list(dict.fromkeys(devices.resolve_precision(p, gpu=False) for p in args.precisions.split(",")))
    work = tempfile.mkdtemp(prefix="bench-generate-")
    try:
        folder = os.path.join(work, "model")
        models.save_model(models.load_model(args.model), folder)
        print(f"model {args.model}, DDIM {args.steps} steps, {cpu_name()} ({os.cpu_count()} CPUs, native bf16: "
              f"{devices.native_bf16_cpu()}, auto -> {auto}), torch {torch.__version__}; steady state: the "
              "difference of a short and a long run", flush=True)
        figures = {"cpu": cpu_name(), "cpus": os.cpu_count(), "native_bf16": devices.native_bf16_cpu(),
                   "auto_precision": auto, "torch": torch.__version__, "model": args.model, "steps": args.steps,
                   "batch_size": args.batch_size}
        os.makedirs(os.path.join(work, "notebook"))
        short, long = map(int, args.notebook_clips.split(","))
        reference = notebook(folder, args.steps, os.path.join(work, "notebook"), short, long, args.repeats)
        figures["notebook_clips_per_s"] = reference
        print(f"notebook (pipe() per clip, fp32, {machine_threads} threads): {rate_text(reference)}", flush=True)
        init_ray()
        for precision in precisions:
            for actors in map(int, args.actors.split(",")):
                result = job(folder, work, args.steps, args.batch_size, actors, precision, args.long, args.repeats)
                rate = result["clips_per_s"]
                ratio = rate / reference if rate and reference else None
                key = f"audiodiff_{precision}_{actors}_actors"
                figures |= {f"{key}_clips_per_s": rate, f"{key}_over_notebook": ratio,
                            f"{key}_start_up_s": result["start_up_s"]}
                print(f"audiodiff, {precision}, {actors} actor{'s' if actors > 1 else ' '}, batch {args.batch_size}: "
                      f"{rate_text(rate)}" + (f"  ({ratio:.2f}x the notebook; start-up {result['start_up_s']:.1f} s "
                                              "a run, excluded)" if ratio else ""), flush=True)
        ray.shutdown()
        for threads in sorted({1, machine_threads}):
            torch.set_num_threads(threads)
            parts = breakdown(folder, work, args.steps, args.batch_size, auto)
            total = sum(parts.values())
            print(f"one actor's time per clip ({auto}, {threads} thread{'s' if threads > 1 else ''}, batch "
                  f"{args.batch_size}): " + ", ".join(f"{k} {v * 1000:.1f} ms ({100 * v / total:.0f}%)"
                                                      for k, v in parts.items()), flush=True)
            figures |= {f"per_clip_ms_{k}_t{threads}": v * 1000 for k, v in parts.items()}
        if args.unet:
            figures |= unet_table(folder, ["fp32", "bf16"], [1, 4, 8, 16], sorted({1, machine_threads}))
        if args.compile:
            for precision in precisions:
                result = compile_check(folder, precision, args.batch_size, machine_threads)
                print(f"torch.compile ({precision}, batch {args.batch_size}, {machine_threads} threads): compiling "
                      f"{result['compile_s']:.1f} s; per clip-step {result['eager_ms']:.2f} ms eager, "
                      f"{result['compiled_ms']:.2f} ms compiled; repaid after {result['break_even_steps']:.0f} "
                      "batch steps (each new batch size or width compiles again)", flush=True)
                figures |= {f"compile_{precision}_{k}": v for k, v in result.items()}
        model = models.load_model(folder)
        height, width = model.image_size
        figures["gflop_per_clip_step"] = forward_flops(model.unet, height, width) / 1e9
        print(json.dumps(figures))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

import contextlib
import dataclasses
import io
import os
import pathlib
import socket
import subprocess
import sys
import time
import uuid

# Ray's single-node loopback mode: every listener and connection stays on 127.0.0.1 (RAY_NOTES.md).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pyarrow.fs as pafs  # noqa: E402
import pytest  # noqa: E402


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server did not listen on 127.0.0.1:{port} within {timeout} s")


@pytest.fixture(scope="session")
def free_port():
    """A function that returns a TCP port free on 127.0.0.1 now (outside Ray's worker range: the kernel's
    ephemeral ports start at 32768)."""
    from audiodiff.runtime import free_loopback_port

    return free_loopback_port


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's standalone S3 server on loopback for the whole session; stopped at the end.

    The standard AWS variables point at it for the whole session, set before any Ray starts, because Ray's
    worker processes keep the environment they started with (as on a cluster, where nodes carry it).
    """
    from audiodiff.runtime import free_loopback_port

    port = free_loopback_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in _AWS_ENV}
    try:
        _wait_for_port(port, process)
        os.environ.update(_AWS_ENV, AWS_ENDPOINT_URL=endpoint)
        yield endpoint
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        process.terminate()
        process.wait(timeout=10)


_AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": ""}


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket on the loopback endpoint."""
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint.removeprefix("http://"), scheme="http",
                           access_key="testing", secret_key="testing", region="us-east-1",
                           allow_bucket_creation=True)
    fs.create_dir(bucket)
    return f"s3://{bucket}"


@pytest.fixture(scope="session")
def local_ray(s3_endpoint):
    """One private local Ray (loopback) shared by the tests that run Ray Data jobs; started after the S3
    endpoint so that its workers see it."""
    import ray

    from audiodiff.runtime import init_ray

    init_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """The node's model cache (audiodiff.models.model_cache) in the session's temporary folder, not the user's
    ~/.cache; set first, before any Ray starts, so that its workers share it as a node's processes do."""
    folder = str(tmp_path_factory.mktemp("model-cache"))
    saved = os.environ.get("AUDIODIFF_MODEL_CACHE")
    os.environ["AUDIODIFF_MODEL_CACHE"] = folder
    yield folder
    os.environ.pop("AUDIODIFF_MODEL_CACHE") if saved is None else os.environ.__setitem__("AUDIODIFF_MODEL_CACHE", saved)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The tiny preset, untrained, saved to a folder once for the session; tests read it and never change it."""
    from audiodiff import models

    folder = tmp_path_factory.mktemp("model") / "tiny"
    models.save_model(models.new_model("tiny"), str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def synthetic_audio(tmp_path_factory):
    """What `write_examples(folder)` writes with its defaults (the demo's and docs' `out/synth`): 4 tracks of 12 s
    per genre at 44.1 kHz; written once for the session, read and never changed by the tests."""
    from audiodiff.synth import write_examples

    folder = tmp_path_factory.mktemp("synth") / "synth"
    write_examples(str(folder))
    return folder


@pytest.fixture(scope="session")
def genre_folder(tmp_path_factory):
    """A folder per genre of synthetic tracks at 44.1 kHz, one each as wav, flac, ogg and mp3, of lengths that
    leave partial slices; encoded once for the session, read and never changed by the tests."""
    import soundfile

    from audiodiff.synth import synthesize

    root = tmp_path_factory.mktemp("genres") / "music"
    for genre, seconds in (("drone", 7.3), ("beats", 4.1), ("arpeggio", 10.0)):
        (root / genre).mkdir(parents=True)
        for i, ext in enumerate(("wav", "flac", "ogg", "mp3")):
            soundfile.write(root / genre / f"{genre} {i}.{ext}", synthesize(genre, seconds + i, 44100, seed=i), 44100)
    return root


@pytest.fixture(scope="session")
def spectrograms(local_ray, tmp_path_factory):
    """A spectrogram dataset of the tiny model, preprocessed once for the session from 3 synthetic tracks of 6 s
    per genre: 36 slices of 64x64 (32 to train on, 4 held out); read and never changed by the tests."""
    from audiodiff.cli import main
    from audiodiff.synth import write_examples

    root = tmp_path_factory.mktemp("train")
    write_examples(str(root / "audio"), tracks_per_genre=3, seconds=6.0)
    assert main(["preprocess", str(root / "audio"), "--model", "tiny", "--output", str(root / "spec"),
                 "--genre-from-folder"]) == 0
    return str(root / "spec")


@pytest.fixture(scope="session")
def tiny_latent_pipeline_folder(tmp_path_factory):
    """A latent AudioDiffusionPipeline saved by diffusers itself: a 2-block AutoencoderKL (64x64 images <->
    4x32x32 latents), a UNet2DModel on its latents, a 64x64 mel and DDIM."""
    import torch
    from diffusers import AudioDiffusionPipeline, AutoencoderKL, DDIMScheduler, Mel, UNet2DModel

    folder = tmp_path_factory.mktemp("tiny-latent") / "model"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vqvae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16),
                              down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                              layers_per_block=1, norm_num_groups=4, sample_size=64)
        unet = UNet2DModel(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                           block_out_channels=(16, 32), norm_num_groups=8,
                           down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    AudioDiffusionPipeline(vqvae=vqvae, unet=unet, mel=Mel(x_res=64, y_res=64),
                           scheduler=DDIMScheduler()).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_conditional_pipeline_folder(tmp_path_factory):
    """A genre-conditioned AudioDiffusionPipeline saved by diffusers itself with pickled .bin weights: a
    UNet2DConditionModel (cross_attention_dim 8) on 64x64 images, a 64x64 mel and DDPM; plus audiodiff's
    conditioning/ with the genres "jazz" and "rock"."""
    import torch
    from diffusers import AudioDiffusionPipeline, DDPMScheduler, Mel, UNet2DConditionModel

    from audiodiff.models import Conditioning

    folder = tmp_path_factory.mktemp("tiny-conditional") / "model"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # attention at 16x16 only, one head (diffusers reads this UNet's attention_head_dim as the number of heads)
        unet = UNet2DConditionModel(sample_size=64, in_channels=1, out_channels=1, layers_per_block=1,
                                    block_out_channels=(8, 16, 16), norm_num_groups=4, cross_attention_dim=8,
                                    attention_head_dim=1,
                                    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
        conditioning = Conditioning(names=["jazz", "rock"], vectors=torch.randn(2, 8), null=torch.randn(8))
    AudioDiffusionPipeline(vqvae=None, unet=unet, mel=Mel(x_res=64, y_res=64),
                           scheduler=DDPMScheduler()).save_pretrained(str(folder), safe_serialization=False)
    conditioning.save_pretrained(str(folder / "conditioning"))
    return str(folder)


@dataclasses.dataclass(frozen=True)
class Demo:
    folder: pathlib.Path
    printed: str


@pytest.fixture(scope="session")
def demo(local_ray, tmp_path_factory):
    """`audiodiff demo` run once for the session, whole (30 epochs: at 8, the genres' clips were not yet each nearest
    their own genre's audio): its folder (synthetic audio, spectrograms, the fine-tuned genre model, clips, page) and
    what it printed; read and never changed by the tests."""
    from audiodiff.cli import main

    folder = tmp_path_factory.mktemp("demo") / "demo"
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")  # a text stream main() can set to line buffering
    with contextlib.redirect_stdout(stdout):
        code = main(["demo", "--output", str(folder)])
    stdout.flush()
    printed = stdout.buffer.getvalue().decode()
    assert code == 0, printed[-3000:]
    return Demo(folder, printed)

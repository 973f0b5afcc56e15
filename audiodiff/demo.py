"""All three stages on a local Ray in a few minutes on 2 cores: synthesised music-like audio in three
"genres" -> spectrogram dataset -> a short fine-tune of the tiny model -> standard and extended clips."""

from __future__ import annotations

import dataclasses
import json
import shutil

from audiodiff import storage
from audiodiff.errors import AudiodiffError
from audiodiff.generate import GenerateConfig, run_generate
from audiodiff.preprocess import PreprocessConfig, run_preprocess
from audiodiff.synth import GENRES, write_examples
from audiodiff.train import TrainConfig, run_finetune

MARKER = "demo.json"


@dataclasses.dataclass
class DemoConfig:
    output: str = "out/demo"  # a local folder
    epochs: int = 6


def _fresh_folder(output: str) -> None:
    """A demo output is replaced by the next demo; anything else already there is left alone."""
    if storage.is_remote(output):
        raise AudiodiffError(f"{output}: the demo writes to a local folder")
    if storage.exists(output) and storage.list_files(output):
        if not storage.exists(storage.join(output, MARKER)):
            raise AudiodiffError(f"{output}: exists and was not written by a demo; choose another --output")
        shutil.rmtree(storage.resolve(output)[1])
    storage.write_bytes(storage.join(output, MARKER), json.dumps({"stages": ["preprocess", "finetune", "generate"]})
                        .encode())


def run_demo(config: DemoConfig) -> str:
    """Runs the demo; returns the path of the gallery page."""
    output = config.output
    _fresh_folder(output)
    audio = storage.join(output, "audio")
    write_examples(audio, tracks_per_genre=4, seconds=12.0)
    print(f"demo: wrote {4 * len(GENRES)} tracks of synthetic audio ({', '.join(GENRES)}) to {audio}", flush=True)
    spectrograms = storage.join(output, "spectrograms")
    run_preprocess(PreprocessConfig(sources=[audio], output=spectrograms, model="tiny", genre_from_folder=True))
    model = storage.join(output, "model")
    run_finetune(TrainConfig(data=spectrograms, model="tiny", output=model, epochs=config.epochs, batch_size=8,
                             warmup_steps=10, checkpoint_every=50, log_every=10))
    result = run_generate(GenerateConfig(model=model, output=storage.join(output, "generated"), num_clips=4,
                                         num_extended=1, scheduler="ddim", steps=50, batch_size=5))
    return result["index"]

"""All three stages on a local Ray in a few minutes on 2 cores: synthesised music-like audio in three
"genres" -> spectrogram dataset -> a short fine-tune of the tiny model, one model for all three genres
(`--condition genre`) -> standard and extended clips of each genre; clips of the untrained model beside the
fine-tuned one's, each scored by the quality figure (`audiodiff evaluate` against the training data, and per
genre: each genre's clips against each genre's audio), on one page."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

from audiodiff import checks, ownership, storage
from audiodiff.clips import summary_line as generate_summary
from audiodiff.errors import AudiodiffError
from audiodiff.evaluate import EvaluateConfig, run_evaluate
from audiodiff.evaluate import summary_line as evaluate_summary
from audiodiff.gallery import side_by_side_html
from audiodiff.generate import GenerateConfig, run_generate
from audiodiff.outputs import GALLERY, read_manifest
from audiodiff.preprocess import PreprocessConfig, run_preprocess
from audiodiff.preprocess import summary_line as preprocess_summary
from audiodiff.synth import GENRES, write_examples
from audiodiff.train import TrainConfig, run_finetune
from audiodiff.train import summary_line as finetune_summary

MARKER = "demo.json"
# what a demo writes beside its marker, and so what the next demo replaces
WROTE = ["audio", "spectrograms", "model", "generated-untrained", "generated", GALLERY]
GUIDANCE = 5.0  # classifier-free guidance of the genre clips: measured best of 1, 3 and 5 by `evaluate --by-genre`


@dataclasses.dataclass
class DemoConfig:
    output: str = "out/demo"  # a local folder
    epochs: int = 30  # at 20, a model trained in fp32 (a CPU without bf16) made drones nearest arpeggio (BENCHMARKS.md)
    lr: float = 1e-3  # the tiny model from scratch on 2 CPU cores: a minute's training must show
    tracks_per_genre: int = 4
    guidance: float = GUIDANCE

    def __post_init__(self):
        """The checks that need no cluster (audiodiff.checks)."""
        checks.finite(self)
        if storage.is_remote(self.output):
            raise AudiodiffError(f"{self.output}: the demo writes to a local folder")
        checks.at_least(self, 1, "epochs", "tracks_per_genre")
        checks.positive(self, "lr")
        checks.at_least(self, 0, "guidance")


def _fresh_folder(output: str) -> None:
    """A demo output is replaced by the next demo: what its demo.json (ownership) lists it wrote; anything else in the
    folder is left alone, and a folder holding anything without a demo's demo.json is refused."""
    folder = storage.resolve(output)[1]
    if ownership.names_in(output):
        record = ownership.read_record(storage.join(output, MARKER)) or {}
        if record.get(ownership.WRITTEN_BY) != ownership.mark("demo"):
            raise AudiodiffError(f"{output}: exists and was not written by a demo (no demo.json of audiodiff's "
                                 "there); choose another --output")
        for name in WROTE:
            path = os.path.join(folder, name)
            if name not in record.get("wrote", []) or not os.path.lexists(path):
                continue
            if os.path.islink(path):
                raise AudiodiffError(f"{path}: a symbolic link where the demo wrote a folder; remove it yourself")
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
    storage.write_bytes(storage.join(output, MARKER), json.dumps(
        {ownership.WRITTEN_BY: ownership.mark("demo"), "wrote": WROTE}, indent=2).encode())


def run_demo(config: DemoConfig) -> dict:
    """Runs the demo; returns the page's path and the quality figures of the untrained and fine-tuned model."""
    output = config.output
    _fresh_folder(output)
    audio = storage.join(output, "audio")
    write_examples(audio, tracks_per_genre=config.tracks_per_genre, seconds=12.0)
    print(f"demo: wrote {config.tracks_per_genre * len(GENRES)} tracks of synthetic audio ({', '.join(GENRES)}) "
          f"to {audio}", flush=True)
    spectrograms = storage.join(output, "spectrograms")
    stats = run_preprocess(PreprocessConfig(sources=[audio], output=spectrograms, model="tiny", genre_from_folder=True))
    print(preprocess_summary(stats), flush=True)
    model = storage.join(output, "model")
    trained = run_finetune(TrainConfig(
        data=spectrograms, model="tiny", output=model, epochs=config.epochs, batch_size=8, lr=config.lr,
        lr_schedule="constant", log_every=25, sample_every=100, checkpoint_every=10_000, condition="genre"))
    print(finetune_summary(trained), flush=True)
    scores, sections = {}, {}
    for name, source in (("untrained", "tiny"), ("fine-tuned", model)):
        folder = f"generated-{name}" if name == "untrained" else "generated"
        conditions = {"genres": list(GENRES), "guidance": config.guidance} if source == model else {}
        print(generate_summary(run_generate(GenerateConfig(
            model=source, output=storage.join(output, folder), num_clips=8 if source != model else 6,
            num_extended=1 if source == model else 0, batch_size=8, **conditions))), flush=True)
        # the floors once, beside the fine-tuned clips: the untrained model's are over 100x them
        evaluation = EvaluateConfig(clips=storage.join(output, folder), reference=spectrograms,
                                    by_genre=source == model, no_floors=source != model)
        scores[name] = run_evaluate(evaluation)
        print(evaluate_summary(scores[name]), flush=True)
        rows = read_manifest(storage.join(output, folder)).to_pylist()
        made_by = "" if name == "untrained" else (f" (EMA weights of step {trained['exported_step']} of "
                                                   f"{trained['steps']}, its best sample step)")
        sections[f"{name} model{made_by}: Fréchet distance {scores[name]['frechet_distance']:.1f}"] = [
            {**r, "wav": f"{folder}/{r['wav']}", "png": f"{folder}/{r['png']}"} for r in rows]
    index = storage.join(output, GALLERY)
    title = "audiodiff demo: the tiny model before and after fine-tuning (lower Fréchet distance is closer to the data)"
    storage.write_bytes(index, side_by_side_html(title, sections).encode())
    before, after = (scores[n]["frechet_distance"] for n in ("untrained", "fine-tuned"))
    print(f"demo: quality (Fréchet distance to the training audio, lower is better): untrained {before:.1f}, "
          f"fine-tuned {after:.1f}", flush=True)
    return {"index": index, "untrained": before, "fine_tuned": after, "by_genre": scores["fine-tuned"]["by_genre"]}

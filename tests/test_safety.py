"""The deletion rule: a command removes or replaces only what it, or an earlier run of it, wrote (recognised by
content), and refuses, naming the folder and what it found, before any work; preprocess keeps its sources and its
output apart. No Ray here: every refusal comes before one is needed."""

import json
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audiodiff import storage
from audiodiff.clips import check_output
from audiodiff.dataset import SpectrogramSink, prepare_output
from audiodiff.demo import DemoConfig, _fresh_folder, run_demo
from audiodiff.encode import png_bytes
from audiodiff.errors import AudiodiffError
from audiodiff.evaluate import EvaluateConfig, run_evaluate
from audiodiff.generate import GenerateConfig, run_generate
from audiodiff.mel import MelConfig
from audiodiff.preprocess import PreprocessConfig, run_preprocess
from audiodiff.remix import RemixConfig, run_remix
from audiodiff.train import TrainConfig, run_finetune

MEL_JSON = MelConfig(x_res=64, y_res=64).to_json()
# a file name preprocess gives its parts, here on a file it did not write
PART_NAME = "part-0123456789abcdef0123.parquet"


def write_dataset(output: str) -> None:
    """A small spectrogram dataset written by preprocess's own writer: mel config, one part, rejects, stats."""
    storage.write_bytes(storage.join(output, "mel_config.json"), MEL_JSON.encode())
    sink = SpectrogramSink(output, started=0.0)
    track = {"source": "a.wav", "genre": None, "reason": None, "seconds": 6.0, "silent": 0, "slices": [0],
             "pngs": [png_bytes(np.zeros((64, 64), np.uint8))]}
    seen = sink.write([pa.Table.from_pylist([track])], ctx=None)
    sink.on_write_complete(types.SimpleNamespace(write_returns=[seen]))


def tree(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# preprocess


def test_preprocess_into_the_folder_above_its_source_refuses_and_keeps_the_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "song.wav").write_bytes(b"RIFF my only copy")
    with pytest.raises(AudiodiffError, match="data/raw: lies inside --output ."):
        run_preprocess(PreprocessConfig(sources=["data/raw"], output=".", overwrite=True))
    # and the output itself, without the source check: data/ holds no part preprocess wrote
    with pytest.raises(AudiodiffError, match=r"^\.: holds what `audiodiff preprocess` did not write "
                                             r"\(data/raw/song.wav\)"):
        prepare_output(".", MEL_JSON, overwrite=True)
    assert (tmp_path / "data" / "raw" / "song.wav").read_bytes() == b"RIFF my only copy"
    assert not (tmp_path / "mel_config.json").exists()


def test_preprocess_refuses_an_output_inside_its_source(tmp_path):
    music = tmp_path / "music"
    music.mkdir()
    with pytest.raises(AudiodiffError, match=r"--output .*music/spectrograms: lies inside the source"):
        run_preprocess(PreprocessConfig(sources=[str(music)], output=str(music / "spectrograms")))
    link = tmp_path / "link"
    link.symlink_to(music)  # the same folder by another name
    with pytest.raises(AudiodiffError, match="lies inside"):
        run_preprocess(PreprocessConfig(sources=[str(link)], output=str(music / "spectrograms")))


def test_overwrite_keeps_files_under_data_that_preprocess_did_not_write(tmp_path):
    output = tmp_path / "out"
    write_dataset(str(output))
    (output / "data" / "notes.txt").write_text("mine")
    pq.write_table(pa.table({"x": [1]}), output / "data" / PART_NAME)  # named like a part, but not one of ours
    before = tree(output)
    with pytest.raises(AudiodiffError, match=f"out: holds what `audiodiff preprocess` did not write "
                                             rf"\(data/notes.txt, data/{PART_NAME}\)"):
        prepare_output(str(output), MEL_JSON, overwrite=True)
    assert tree(output) == before


def test_overwrite_replaces_a_dataset_preprocess_wrote(tmp_path):
    output = tmp_path / "out"
    write_dataset(str(output))
    with pytest.raises(AudiodiffError, match="already holds a spectrogram dataset"):
        prepare_output(str(output), MEL_JSON, overwrite=False)
    other = MelConfig(x_res=128, y_res=64).to_json()  # another mel config: the old one is ours beside our dataset
    prepare_output(str(output), other, overwrite=True)
    assert sorted(tree(output)) == ["mel_config.json", "rejects.parquet"]  # rejects are rewritten at the end
    assert (output / "mel_config.json").read_text() == other


def test_a_mel_config_alone_is_replaced_only_by_the_same(tmp_path):
    model_mel = tmp_path / "model" / "mel"  # e.g. a model's own mel folder given as --output
    model_mel.mkdir(parents=True)
    (model_mel / "mel_config.json").write_text(MelConfig(x_res=256, y_res=256).to_json())
    with pytest.raises(AudiodiffError, match=r"did not write \(mel_config.json\)"):
        prepare_output(str(model_mel), MEL_JSON, overwrite=True)
    (model_mel / "mel_config.json").write_text(MEL_JSON)  # an interrupted run of the same settings goes on
    prepare_output(str(model_mel), MEL_JSON, overwrite=False)


def test_a_symbolic_link_under_data_is_not_followed(tmp_path):
    elsewhere = tmp_path / "music"
    elsewhere.mkdir()
    (elsewhere / "song.flac").write_bytes(b"fLaC keep")
    output = tmp_path / "out"
    write_dataset(str(output))
    (output / "data" / "linked").symlink_to(elsewhere)
    (output / "stats-link.json").symlink_to(elsewhere / "song.flac")
    with pytest.raises(AudiodiffError, match=r"data/linked \(a symbolic link\), stats-link.json \(a symbolic link\)"):
        prepare_output(str(output), MEL_JSON, overwrite=True)
    assert (elsewhere / "song.flac").read_bytes() == b"fLaC keep"
    assert (output / "data" / "linked").is_symlink() and (output / "stats.json").exists()


def test_overwrite_on_object_storage_keeps_objects_preprocess_did_not_write(s3_bucket):
    output = f"{s3_bucket}/spectrograms"
    write_dataset(output)
    storage.write_bytes(f"{output}/data/their-notes.txt", b"keep")
    storage.write_bytes(f"{output}/data/old/{PART_NAME}", b"PAR1 not ours")
    with pytest.raises(AudiodiffError, match=f"did not write \\(data/old/{PART_NAME}, data/their-notes.txt\\)"):
        prepare_output(output, MEL_JSON, overwrite=True)
    assert storage.read_bytes(f"{output}/data/their-notes.txt") == b"keep"
    assert storage.read_bytes(f"{output}/data/old/{PART_NAME}") == b"PAR1 not ours"
    assert storage.exists(f"{output}/stats.json")  # refused before anything was removed
    storage.delete(f"{output}/data/their-notes.txt")
    storage.delete(f"{output}/data/old/{PART_NAME}")
    prepare_output(output, MEL_JSON, overwrite=True)  # the dataset alone is ours: replaced
    assert [f.rsplit("/", 1)[-1] for f in storage.list_files(output)] == ["mel_config.json", "rejects.parquet"]


# demo


@pytest.mark.parametrize("content", [b'{"stages": ["preprocess", "finetune", "generate"]}', b"my notes"])
def test_demo_refuses_a_folder_with_a_demo_json_it_did_not_write(tmp_path, content):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "demo.json").write_bytes(content)
    (folder / "chapter1.tex").write_text("keep me")
    with pytest.raises(AudiodiffError, match="thesis: exists and was not written by a demo"):
        run_demo(DemoConfig(output=str(folder)))
    assert tree(folder) == {"demo.json": content, "chapter1.tex": b"keep me"}


def test_a_demo_replaces_only_what_the_last_demo_wrote(tmp_path):
    folder = tmp_path / "demo"
    _fresh_folder(str(folder))
    (folder / "audio").mkdir()
    (folder / "audio" / "a.wav").write_bytes(b"RIFF")
    (folder / "index.html").write_text("page")
    (folder / "my-notes.txt").write_text("keep me")
    _fresh_folder(str(folder))
    assert sorted(tree(folder)) == ["demo.json", "my-notes.txt"]


# clip commands


def foreign_gallery(folder) -> dict:
    folder.mkdir()
    (folder / "index.html").write_text("<html>my website</html>")
    pq.write_table(pa.table({"clip_id": ["mine"], "seed": [1]}), folder / "manifest.parquet")
    return tree(folder)


def test_generate_into_a_folder_it_did_not_write_refuses_and_leaves_it(tmp_path):
    folder = tmp_path / "site"
    before = foreign_gallery(folder)
    with pytest.raises(AudiodiffError, match=r"site: holds what `audiodiff generate` did not write "
                                             r"\(index.html, manifest.parquet\)"):
        run_generate(GenerateConfig(model="tiny", output=str(folder), num_clips=1, steps=1))
    assert tree(folder) == before


def test_remix_into_a_folder_it_did_not_write_refuses_and_leaves_it(tmp_path):
    folder = tmp_path / "site"
    before = foreign_gallery(folder)
    (tmp_path / "song.wav").write_bytes(b"RIFF")
    with pytest.raises(AudiodiffError, match="did not write"):
        run_remix(RemixConfig(sources=[str(tmp_path / "song.wav")], model="tiny", output=str(folder)))
    assert tree(folder) == before


def test_clip_outputs_are_replaced_only_by_the_command_that_wrote_them(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    record = {"written_by": "audiodiff remix"}
    (folder / "generation.json").write_text(json.dumps(record))
    with pytest.raises(AudiodiffError, match="holds the output of `audiodiff remix`"):
        check_output(GenerateConfig(model="tiny", output=str(folder)), "generate")
    (folder / "generation.json").write_text(json.dumps({**record, "written_by": "audiodiff generate"}))
    (folder / "index.html").write_text("<html>replaced by hand</html>")
    with pytest.raises(AudiodiffError, match=r"did not write \(index.html\)"):
        check_output(GenerateConfig(model="tiny", output=str(folder)), "generate")
    (folder / "generation.json").write_bytes(b"\xff not json")  # a damaged record is no record of ours
    with pytest.raises(AudiodiffError, match=r"did not write \(generation.json, index.html\)"):
        check_output(GenerateConfig(model="tiny", output=str(folder)), "generate")


def test_remix_refuses_a_source_inside_its_output(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "song.wav").write_bytes(b"RIFF")
    with pytest.raises(AudiodiffError, match="song.wav: lies inside --output"):
        run_remix(RemixConfig(sources=[str(tmp_path / "out" / "song.wav")], model="tiny", output=str(tmp_path / "out")))


# finetune and evaluate


def test_finetune_into_a_folder_it_did_not_write_refuses(tmp_path):
    model = tmp_path / "my-model"  # e.g. the model being fine-tuned, given as --output too
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    before = tree(model)
    with pytest.raises(AudiodiffError, match=r"my-model: holds what `audiodiff finetune` did not write "
                                             r"\(model_index.json, unet\)"):
        run_finetune(TrainConfig(data=str(tmp_path / "data"), model=str(model), output=str(model)))
    assert tree(model) == before


def test_evaluate_does_not_replace_a_file_it_did_not_write(tmp_path):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    with pytest.raises(AudiodiffError, match="notes.json: a file `audiodiff evaluate` did not write"):
        run_evaluate(EvaluateConfig(clips=str(tmp_path), reference=str(tmp_path), output=str(notes)))
    assert notes.read_text() == '{"mine": true}'

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from audiodiff import storage
from audiodiff.encode import png_bytes, wav_bytes
from audiodiff.errors import AudiodiffError
from audiodiff.evaluate import EvaluateConfig, run_evaluate, summary_line
from audiodiff.generate import GenerateConfig, run_generate
from audiodiff.mel import SILENT, MelCodec, MelConfig
from audiodiff.memorisation import COPY_THRESHOLD_DB, aligned_distance, cut_windows, training_mel
from audiodiff.preprocess import PreprocessConfig, run_preprocess
from audiodiff.remix import RemixConfig, run_remix
from audiodiff.synth import synthesize

TINY = MelConfig(x_res=64, y_res=64)


# the pure functions


def test_aligned_distance_finds_a_shifted_copy_and_its_shift():
    codec = MelCodec(TINY)
    images = codec.audio_to_images(synthesize("arpeggio", 6.0, seed=3))
    wide = torch.cat(list(images), dim=-1)
    window = wide[None, :, 10:74]  # starts 10 frames into the first slice
    distance, shift = aligned_distance(window, images[:1], max_shift=16, top_db=TINY.top_db)
    assert distance[0] == 0 and shift[0] == -10
    unaligned, _ = aligned_distance(window, images[:1], max_shift=0, top_db=TINY.top_db)
    assert unaligned[0] > COPY_THRESHOLD_DB  # without the shift it would be missed


def test_clips_are_cut_into_slice_wide_windows_without_silence_and_other_sizes_are_refused():
    audible = np.random.default_rng(0).integers(0, 200, (64, 150), dtype=np.uint8)
    windows = cut_windows([("a", audible), ("silent", np.full((64, 64), SILENT, np.uint8))], TINY)
    assert windows.clips == ["a", "silent"] and windows.owner.tolist() == [0, 0]
    assert windows.offset.tolist() == [0, 64] and windows.images.shape == (2, 64, 64)
    with pytest.raises(AudiodiffError, match=r"wide: a spectrogram of 128x256, the training data's slices are 64x64"):
        cut_windows([("wide", np.zeros((128, 256), np.uint8))], TINY)


# on Ray, with the demo's model, trained on the synthetic genres


@pytest.fixture(scope="module")
def trained(demo):
    """The demo's output: its synthetic genres (`audio`, 4 tracks of 12 s per genre), their spectrogram dataset (96
    slices of 64x64) and the tiny model fine-tuned on them for 300 steps (lr 1e-3 constant, batch 8): the data and
    recipe the README's threshold was measured on."""
    return demo.folder


@pytest.mark.slow
def test_planted_copies_are_flagged_and_clean_clips_are_not(trained, tmp_path):
    data, model = str(trained / "spectrograms"), str(trained / "model")
    # a training track remixed at strength 0.1, checked after writing: every remix marked in manifest and gallery
    remix = run_remix(RemixConfig(model=model, output=str(tmp_path / "remix"),
                                  sources=[str(trained / "audio" / "beats" / "beats-0.wav")], strength=0.1, training=data))
    rows = pq.read_table(tmp_path / "remix" / "manifest.parquet").to_pylist()
    remixes = [r for r in rows if r["kind"] == "remix"]
    assert remixes and all(r["copy_of"] == f"{r['source']}#{r['slice']}" for r in remixes)
    assert all(r["copy_of"] is None for r in rows if r["kind"] == "input")  # the inputs are not checked
    page = (tmp_path / "remix" / "index.html").read_text()
    assert page.count('class="copy-mark"') == len(remixes)
    assert remix["memorisation"]["copies"] == len(remixes)
    # clips from noise, checked after writing: mostly not marked
    generated = run_generate(GenerateConfig(model=model, output=str(tmp_path / "clips"), num_clips=8, training=data))
    rows = pq.read_table(tmp_path / "clips" / "manifest.parquet").to_pylist()
    # "mostly not" (the word): the synthetic drones repeat themselves, so a generated drone can sit
    # within the threshold of a training drone slice (README: the rate on these tracks)
    flagged = sum(r["copy_of"] is not None for r in rows)
    assert flagged <= len(rows) // 4 and generated["memorisation"]["copies"] == flagged
    assert (tmp_path / "clips" / "index.html").read_text().count('class="copy-mark"') == flagged
    # evaluate: the clips, and a training track itself as audio (an exact copy of each of its slices)
    storage.write_bytes(str(tmp_path / "copy" / "drone.wav"), (trained / "audio" / "drone" / "drone-0.wav").read_bytes())
    for clips, copies in ((tmp_path / "clips", flagged), (tmp_path / "copy", 1)):
        config = EvaluateConfig(clips=str(clips), training=data, output=str(tmp_path / f"{clips.name}.json"))
        result = run_evaluate(config)["memorisation"]
        assert result["copies"] == copies and result["threshold_db"] == COPY_THRESHOLD_DB
        assert json.loads((tmp_path / f"{clips.name}.json").read_text())["memorisation"] == result
        assert f"memorisation: {copies} of {len(result['clips'])} clips a near-copy" in summary_line(
            {"memorisation": result, "output": config.output})
    exact = result["clips"][0]
    assert exact["distance"] == 0 and exact["audio_file"].endswith("drone-0.wav") and exact["shift"] == 0


@pytest.mark.slow
def test_bad_training_data_is_refused_in_one_line_naming_it(trained, tmp_path):
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "track.wav").write_bytes(wav_bytes(synthesize("drone", 2.0), TINY.sample_rate))
    with pytest.raises(AudiodiffError, match=r"^--training .*audio: no parquet files"):
        training_mel(str(tmp_path / "audio"))
    wide = str(tmp_path / "wide")
    run_preprocess(PreprocessConfig(sources=[str(tmp_path / "audio")], output=wide,
                                    mel_config=_mel_json(tmp_path, MelConfig(x_res=128, y_res=64))))
    with pytest.raises(AudiodiffError, match=r"^--training .*wide: its mel config \(64x128, .*\) is not the "
                                             r"clips' \(.*64x64"):
        run_generate(GenerateConfig(model=str(trained / "model"), output=str(tmp_path / "out"), num_clips=1,
                                    training=wide))
    assert not (tmp_path / "out" / "clips").exists()  # refused before any clip was made
    clips = tmp_path / "tiny-clips"  # what generate leaves, as far as the check reads it
    storage.write_bytes(str(clips / "clips" / "standard-00000.png"), png_bytes(np.zeros((64, 64), np.uint8)))
    pq.write_table(pa.table({"clip_id": ["standard-00000"], "kind": ["standard"], "png": ["clips/standard-00000.png"],
                             "model": ["tiny"]}), clips / "manifest.parquet")
    with pytest.raises(AudiodiffError, match=r"^--training .*wide: its mel config \(64x128, .*\) is not the "
                                             r"clips' \(.*tiny-clips, made by tiny: 64x64"):
        run_evaluate(EvaluateConfig(clips=str(clips), training=wide))


def _mel_json(folder, mel: MelConfig) -> str:
    path = folder / "mel_config.json"
    path.write_text(mel.to_json())
    return str(path)


def test_evaluate_needs_a_reference_or_training_data():
    with pytest.raises(AudiodiffError, match="give --reference .*, --training .* or both"):
        EvaluateConfig(clips="out/clips")

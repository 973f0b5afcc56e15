import contextlib
import json

import numpy as np
import pytest
import torch
from diffusers import Mel
from PIL import Image

from audiodiff.errors import AudiodiffError
from audiodiff.mel import MelCodec, MelConfig
from audiodiff.synth import synthesize

SR = 22050


def reference_images(audio: np.ndarray, config: MelConfig) -> np.ndarray:
    mel = Mel(**vars(config))
    mel.load_audio(raw_audio=audio)
    return np.stack([np.asarray(mel.audio_slice_to_image(i)) for i in range(mel.get_number_of_slices())])


@contextlib.contextmanager
def torch_threads(n: int):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _signals():
    rng = np.random.default_rng(1)
    t = np.arange(SR * 13) / SR
    return {
        "tone": (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32),
        "tone sweep": (0.3 * np.sin(2 * np.pi * (100 + 300 * t) * t)).astype(np.float32),
        "white noise": (0.1 * rng.standard_normal(t.size)).astype(np.float32),
        "drone": synthesize("drone", 13, SR, seed=2),
        "beats": synthesize("beats", 13, SR, seed=3),
        "arpeggio": synthesize("arpeggio", 13, SR, seed=4),
        "silence": np.zeros(SR * 7, dtype=np.float32),
        "shorter than one slice": synthesize("beats", 2.0, SR, seed=5),
        "one sample": np.array([0.5], dtype=np.float32),
    }


@pytest.mark.parametrize("config", [MelConfig(), MelConfig(x_res=64, y_res=64)], ids=["256", "64"])
@pytest.mark.parametrize("kind", list(_signals()))
def test_audio_to_images_matches_diffusers_mel(kind, config):
    audio = _signals()[kind]
    expected = reference_images(audio, config)
    codec = MelCodec(config)
    for threads in (1, 2):  # one thread: the mel product by band groups, as preprocess workers run; two: dense
        with torch_threads(threads):
            ours = codec.audio_to_images(audio)
        assert ours.dtype == torch.uint8
        assert tuple(ours.shape) == expected.shape  # same slice count and padding as Mel
        difference = np.abs(ours.numpy().astype(int) - expected.astype(int))
        # A grey level is top_db / 255 (0.31 dB). float32 torch against librosa's float32/float64 mix rounds a pixel
        # that lies on a level boundary either way: measured on at most 0.015% of a signal's pixels (0.004% over
        # all), the same with ATen's default, AVX2 and AVX-512 kernels; 0.1% leaves a sixfold margin, and one level
        # is the most rounding can move.
        assert difference.max() <= 1
        assert (difference == 0).mean() >= 0.999


def test_audio_to_images_takes_numpy_and_torch_and_chunks_long_audio():
    config = MelConfig(x_res=64, y_res=64)
    audio = synthesize("drone", 60, SR, seed=0)
    whole = MelCodec(config, slices_per_batch=1000).audio_to_images(audio)
    chunked = MelCodec(config, slices_per_batch=3).audio_to_images(torch.from_numpy(audio))
    assert whole.shape[0] == len(audio) // config.slice_size
    # Equal here on every capability; a CPU whose matrix kernels block by batch size may round a boundary pixel
    # to the next grey level, as in the comparison with diffusers above, so the same bound applies.
    difference = (whole.int() - chunked.int()).abs()
    assert difference.max() <= 1 and (difference == 0).float().mean() >= 0.999


@pytest.mark.filterwarnings("ignore:At least one mel filterbank has all zero values")
@pytest.mark.parametrize("config", [MelConfig(), MelConfig(x_res=64, y_res=64), MelConfig(y_res=512, n_fft=512)],
                         ids=["256", "64", "512 bands of 257 bins, some empty"])
def test_cpu_mel_product_by_band_groups_leaves_out_only_zeros_and_gives_the_dense_products_images(config):
    codec = MelCodec(config)
    rebuilt, row = torch.zeros_like(codec._mel_basis), 0
    for first, last, weights in codec._band_groups:
        rebuilt[row:row + weights.shape[0], first:last] = weights
        row += weights.shape[0]
    assert torch.equal(rebuilt, codec._mel_basis)
    dense = MelCodec(config)
    dense._band_groups = None  # the accelerators' path: one product with the whole bank
    audio = synthesize("arpeggio", 13, SR, seed=4)
    with torch_threads(1):  # by band groups on one thread only, as preprocess workers run
        difference = (codec.audio_to_images(audio).int() - dense.audio_to_images(audio).int()).abs()
    # the same terms summed in another order: equal here; at most a boundary pixel's rounding, as above
    assert difference.max() <= 1 and (difference == 0).float().mean() >= 0.999


def _reencoding_error(audio: np.ndarray, image: np.ndarray, config: MelConfig) -> float:
    return float(np.abs(reference_images(audio.astype(np.float32), config)[0].astype(int) - image.astype(int)).mean())


def test_inverse_reencodes_at_least_as_close_as_librosa():
    config = MelConfig()
    audio = np.concatenate([synthesize("arpeggio", 6, SR, seed=7), synthesize("beats", 6, SR, seed=8)])
    images = reference_images(audio, config)
    reference = Mel(**vars(config))
    librosa_error = np.mean([_reencoding_error(reference.image_to_audio(Image.fromarray(im)), im, config)
                             for im in images])
    ours = MelCodec(config).images_to_audio(torch.from_numpy(images))
    our_error = np.mean([_reencoding_error(a, im, config) for a, im in zip(ours.numpy(), images)])
    # mean grey levels, measured 3.28 against librosa's 4.54; ATen's default kernels on 1 thread and AVX-512 on 2
    # move ours by under 0.001, far inside that gap
    assert our_error <= librosa_error, (our_error, librosa_error)


@pytest.mark.parametrize("factor", [1, 4])
def test_images_to_audio_lengths_standard_and_extended(factor):
    config = MelConfig()
    images = torch.randint(0, 256, (2, 256, 256 * factor), dtype=torch.uint8)
    audio = MelCodec(config).images_to_audio(images)
    assert audio.dtype == torch.float32
    assert tuple(audio.shape) == (2, 512 * (256 * factor - 1))
    seconds = audio.shape[1] / config.sample_rate
    assert seconds == pytest.approx({1: 5.92, 4: 23.75}[factor], abs=0.01)


def test_images_to_audio_is_the_same_alone_or_in_a_batch():
    config = MelConfig(x_res=64, y_res=64)
    codec = MelCodec(config)
    images = codec.audio_to_images(synthesize("arpeggio", 8, SR, seed=9))
    batch = codec.images_to_audio(images)
    # Batched FFT kernels round differently from single ones, and Griffin-Lim's 32 momentum iterations amplify
    # that last-bit difference: measured at up to 6e-4 of the peak on an Intel AMX CPU, 0 on an AMD EPYC.
    # 2e-3 of the peak (-54 dB) leaves room for other CPUs and is far below anything audible.
    for i in range(images.shape[0]):
        alone = codec.images_to_audio(images[i:i + 1])[0]
        torch.testing.assert_close(alone, batch[i], atol=2e-3 * float(batch[i].abs().max()), rtol=0)


def test_images_to_audio_rejects_wrong_shapes_and_dtypes():
    codec = MelCodec(MelConfig(x_res=64, y_res=64))
    with pytest.raises(ValueError, match="uint8"):
        codec.images_to_audio(torch.zeros(1, 64, 64))
    with pytest.raises(ValueError, match=r"\[batch, 64, width\]"):
        codec.images_to_audio(torch.zeros(1, 32, 64, dtype=torch.uint8))


def test_mel_config_json_round_trips_with_diffusers(tmp_path):
    config = MelConfig(x_res=64, y_res=128, hop_length=256, top_db=60, n_iter=16)
    (tmp_path / "mel_config.json").write_text(config.to_json())
    loaded = Mel.from_pretrained(str(tmp_path))
    assert (loaded.x_res, loaded.y_res, loaded.hop_length, loaded.top_db, loaded.n_iter) == (64, 128, 256, 60, 16)
    Mel(x_res=32, y_res=48, sample_rate=16000).save_config(str(tmp_path / "theirs"))
    theirs = MelConfig.from_json((tmp_path / "theirs" / "mel_config.json").read_text())
    assert theirs == MelConfig(x_res=32, y_res=48, sample_rate=16000)
    assert json.loads(config.to_json())["_class_name"] == "Mel"


def test_mel_config_rejects_bad_values():
    with pytest.raises(AudiodiffError, match="x_res must be a positive integer"):
        MelConfig(x_res=0)
    with pytest.raises(AudiodiffError, match="unknown mel config keys"):
        MelConfig.from_dict({"x_res": 64, "hop": 3})
    with pytest.raises(AudiodiffError, match="not valid JSON"):
        MelConfig.from_json("{", "model/mel/mel_config.json")


@pytest.mark.parametrize("field, value", [("n_fft", 1 << 28), ("n_iter", 10 ** 9), ("x_res", 100_000), ("y_res", 4),
                                          ("sample_rate", 10 ** 7), ("hop_length", 1 << 20), ("top_db", 1000)])
def test_mel_config_json_out_of_bounds_names_the_file_and_field(field, value):
    # n_fft 2^28 asked for a 137 GB mel basis; n_iter 1e9 for a vocoder that never ends
    with pytest.raises(AudiodiffError, match=rf"^model/mel/mel_config.json: {field} {value} is outside \d+\.\.\d+"):
        MelConfig.from_json(json.dumps({field: value}), "model/mel/mel_config.json")


def test_mel_config_bounds_the_audio_of_one_image():
    with pytest.raises(AudiodiffError, match="x_res 4096 x hop_length 16384 is 67108864 samples per image"):
        MelConfig.from_dict({"x_res": 4096, "hop_length": 16384}, "m.json")


def test_mel_config_json_that_is_not_utf8_is_one_line_naming_the_file():
    with pytest.raises(AudiodiffError, match=r"^data/mel_config.json: not UTF-8 text \(invalid start byte at byte 0\)"):
        MelConfig.from_json(b"\xff\xfe{\x00}\x00", "data/mel_config.json")


def test_wide_images_are_vocoded_in_bounded_overlapping_windows(monkeypatch):
    # a long clip's Griffin-Lim ran over its whole width: memory grew with --seconds (7-8 GB for an hour)
    config = MelConfig(x_res=64, y_res=64, n_iter=8)
    codec = MelCodec(config)
    audio = np.concatenate([synthesize(g, 4, config.sample_rate, seed=i)
                            for i, g in enumerate(["arpeggio", "drone", "beats"] * 2)])
    slices = codec.audio_to_images(audio)
    wide = torch.cat(list(slices), dim=-1)[None]  # 16 images side by side: 4 windows
    assert codec.vocoder_window == 4 * config.x_res < wide.shape[-1]
    widths = []
    griffin_lim = codec._griffin_lim
    monkeypatch.setattr(codec, "_griffin_lim", lambda m, a=None: widths.append(m.shape[-1]) or griffin_lim(m, a))
    windowed = codec.images_to_audio(wide)
    assert widths and max(widths) <= codec.vocoder_window and len(widths) > 1
    assert windowed.shape == (1, config.samples_for_width(wide.shape[-1])) and torch.isfinite(windowed).all()
    whole = codec._vocode(wide)[0]  # the whole width at once, as before

    def distance(clip):  # mean grey-level difference of the clip's own spectrogram to the image it came from
        back = codec.audio_to_images(clip[0].numpy())
        return (back.float() - slices[:len(back)].float()).abs().mean()

    # the seams cost little: the windowed audio re-encodes about as close to the image as one piece does
    assert distance(windowed) <= 1.1 * distance(whole)

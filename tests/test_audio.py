import io

import numpy as np
import pytest
import soundfile

from audiodiff.audio import decode, load_audio, resample, to_mono
from audiodiff.errors import BadAudioError
from audiodiff.synth import synthesize

FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS"),
           "mp3": ("MP3", "MPEG_LAYER_III")}


def encode(audio: np.ndarray, sample_rate: int, ext: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    fmt, default_subtype = FORMATS[ext]
    soundfile.write(buffer, audio, sample_rate, format=fmt, subtype=subtype or default_subtype)
    return buffer.getvalue()


@pytest.mark.parametrize("ext", list(FORMATS))
def test_each_format_decodes_to_mono_at_the_codec_rate(ext, tmp_path):
    stereo = np.stack([synthesize("drone", 3, 44100, seed=1), synthesize("beats", 3, 44100, seed=2)], axis=1)
    data = encode(stereo, 44100, ext)
    path = tmp_path / f"track with spaces ünïcode.{ext}"
    path.write_bytes(data)
    from_bytes = load_audio(data, 22050, source=path.name)
    from_file = load_audio(path, 22050)
    assert from_bytes.dtype == np.float32 and from_bytes.ndim == 1
    np.testing.assert_array_equal(from_bytes, from_file)
    assert abs(len(from_bytes) - 3 * 22050) <= 1200  # mp3 and vorbis pad a frame
    if ext in ("wav", "flac"):  # lossless: the mono mix survives to within 16-bit quantisation
        expected = resample(stereo.mean(axis=1).astype(np.float32), 44100, 22050)
        # 16-bit steps are 3e-5 of full scale; the resampler's filter sums a few of them (measured 5e-5 of the
        # peak, the same with every ATen capability and thread count: soundfile and soxr do not use torch).
        # 1e-3 of the peak (-60 dB) is 20 times that.
        np.testing.assert_allclose(from_bytes, expected, atol=1e-3 * np.abs(expected).max(), rtol=0)


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_24", "FLOAT", "DOUBLE"])
def test_odd_but_valid_wav_sample_formats_decode(subtype):
    audio = synthesize("arpeggio", 1, 8000, seed=3)
    decoded, rate = decode(encode(audio, 8000, "wav", subtype), "x.wav")
    assert rate == 8000 and decoded.shape == (8000, 1)
    # integer formats lose under one step of their quantisation (full scale 1.0); float ones nothing
    step = {"PCM_U8": 2 ** -7, "PCM_24": 2 ** -23, "FLOAT": 0, "DOUBLE": 0}[subtype]
    np.testing.assert_allclose(decoded[:, 0], audio, atol=step, rtol=0)


def test_many_channels_and_high_rates_mix_and_resample():
    audio = np.random.default_rng(0).uniform(-0.5, 0.5, size=(96000, 6)).astype(np.float32)
    mono = load_audio(encode(audio, 96000, "wav", "FLOAT"), 22050, source="six.wav")
    assert len(mono) == 22050
    np.testing.assert_allclose(to_mono(audio), audio.mean(axis=1), atol=1e-7)


def test_resample_keeps_in_band_tone_and_removes_aliases():
    t = np.arange(44100 * 2) / 44100
    amplitude = 0.5
    tone = resample((amplitude * np.sin(2 * np.pi * 1000 * t)).astype(np.float32), 44100, 22050)
    ideal = amplitude * np.sin(2 * np.pi * 1000 * np.arange(len(tone)) / 22050)
    # soxr's HQ preset is specified to 20 bits (-120 dB); measured 5e-7 of the amplitude for both. 1e-5 of the
    # amplitude (-100 dB) leaves a 20-fold margin and still fails any resampler that lets an alias through.
    assert np.abs(tone[1000:-1000] - ideal[1000:-1000]).max() < 1e-5 * amplitude
    alias = resample((amplitude * np.sin(2 * np.pi * 12000 * t)).astype(np.float32), 44100, 22050)
    assert np.abs(alias[1000:-1000]).max() < 1e-5 * amplitude  # above the new Nyquist frequency: gone


def _bad_inputs():
    audio = synthesize("drone", 2, 22050, seed=4)
    wav, flac, mp3 = encode(audio, 22050, "wav"), encode(audio, 22050, "flac"), encode(audio, 22050, "mp3")
    nan = audio.copy()
    nan[100] = np.nan
    inf = audio.copy()
    inf[5] = np.inf
    return {
        "empty": (b"", "empty file"),
        "not audio": (b"This is a text file, not a song.\n" * 50, "not decodable as audio"),
        "truncated wav": (wav[: len(wav) // 2], "truncated WAV"),
        "truncated flac": (flac[: len(flac) // 2], "not decodable as audio"),
        "truncated mp3": (mp3[: len(mp3) // 3], "truncated"),
        "header only": (wav[:44], "truncated WAV"),
        "zero samples": (encode(audio[:0], 22050, "wav"), "no audio samples"),
        "nan samples": (encode(nan, 22050, "wav", "FLOAT"), "non-finite samples"),
        "infinite samples": (encode(inf, 22050, "wav", "FLOAT"), "non-finite samples"),
    }


@pytest.mark.parametrize("kind", list(_bad_inputs()))
def test_bad_audio_raises_the_project_exception_naming_the_input(kind):
    data, reason = _bad_inputs()[kind]
    with pytest.raises(BadAudioError) as error:
        load_audio(data, 22050, source=f"bucket/{kind}.wav")
    assert str(error.value).startswith(f"bucket/{kind}.wav: ")
    assert reason in error.value.reason
    assert "BytesIO" not in str(error.value)


def test_unreadable_file_raises_the_project_exception(tmp_path):
    with pytest.raises(BadAudioError, match="missing.wav: cannot read file"):
        load_audio(tmp_path / "missing.wav", 22050)

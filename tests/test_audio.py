import io
import struct

import av
import numpy as np
import pytest
import soundfile

from audiodiff.audio import AUDIO_EXTENSIONS, BLOCK_FRAMES, MAX_CHANNELS, MIN_SAMPLE_RATE, load_audio, \
    resample, stream_audio, to_mono
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
    decoded = load_audio(encode(audio, 8000, "wav", subtype), 8000, "x.wav")  # at its own rate: not resampled
    assert decoded.shape == (8000,)
    # integer formats lose under one step of their quantisation (full scale 1.0); float ones nothing
    step = {"PCM_U8": 2 ** -7, "PCM_24": 2 ** -23, "FLOAT": 0, "DOUBLE": 0}[subtype]
    np.testing.assert_allclose(decoded, audio, atol=step, rtol=0)


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


def _wav_with_header(rate: int, channels: int | None = None) -> bytes:
    """A short 16-bit WAV whose header's sample rate (and byte rate) says `rate`, as a damaged file's might."""
    data = bytearray(encode(synthesize("drone", 1, 8000, seed=5), 8000, "wav"))
    struct.pack_into("<II", data, 24, rate, rate * 2)
    return bytes(data)


@pytest.mark.parametrize("rate", [1, 999, 768_001, 5_000_000])
def test_a_sample_rate_out_of_bounds_is_refused_before_decoding(rate):
    # at 1 Hz, 8000 frames would have become 176 M samples (700 MB) at 22050 Hz
    with pytest.raises(BadAudioError, match=f"sample rate {rate} Hz in its header is outside 1000-768000 Hz"):
        load_audio(_wav_with_header(rate), 22050, source="odd.wav")


def test_too_many_channels_are_refused():
    audio = np.zeros((100, MAX_CHANNELS + 1), np.float32)
    with pytest.raises(BadAudioError, match=f"{MAX_CHANNELS + 1} channels in its header"):
        load_audio(encode(audio, 8000, "wav", "FLOAT"), 22050, source="many.wav")


def test_resampled_blocks_stay_bounded_at_the_lowest_rate():
    # 1000 Hz -> 22050 Hz: each input frame becomes 22 samples; blocks are read so that the output stays near the
    # block size instead of 22 times it (one block of all 8000 frames gave 176 k samples)
    data = encode(synthesize("drone", 8, MIN_SAMPLE_RATE, seed=6), MIN_SAMPLE_RATE, "wav")
    blocks = list(stream_audio(data, 22050, "low.wav"))
    assert max(map(len, blocks)) <= 1.25 * BLOCK_FRAMES  # soxr releases its output in bursts (measured 1.09x)
    np.testing.assert_array_equal(np.concatenate(blocks), load_audio(data, 22050, "low.wav"))


LIBSNDFILE_EXTENSIONS = {"AIFF": ".aiff", "AU": ".au", "AVR": ".avr", "CAF": ".caf", "FLAC": ".flac", "HTK": ".htk",
                         "SVX": ".svx", "MAT4": ".mat", "MAT5": ".mat", "MPC2K": None, "MP3": ".mp3", "OGG": ".ogg",
                         "PAF": ".paf", "PVF": ".pvf", "RAW": None, "RF64": ".rf64", "SD2": None, "SDS": ".sds",
                         "IRCAM": ".sf", "VOC": ".voc", "W64": ".w64", "WAV": ".wav", "NIST": ".nist",
                         "WAVEX": ".wav", "WVE": ".wve", "XI": ".xi"}


@pytest.mark.parametrize("fmt", sorted(soundfile.available_formats()))
def test_every_format_libsndfile_reads_is_chosen_by_its_extension_and_decodes(fmt, tmp_path):
    extension = LIBSNDFILE_EXTENSIONS[fmt]  # a format the bundled libsndfile gained is listed here first
    if extension is None:
        pytest.skip(f"{fmt}: headerless, an extension FFmpeg's Musepack also claims (.mpc), or a header kept in a "
                    "macOS resource fork (.sd2, listed but not writable here)")
    assert extension in AUDIO_EXTENSIONS
    subtypes = soundfile.available_subtypes(fmt)
    subtype = next((s for s in ("PCM_16", "VORBIS", "MPEG_LAYER_III", "DPCM_16", "PCM_S8", "ALAW") if s in subtypes),
                   None)
    rate = 8000 if fmt in ("WVE", "VOC") else 22050
    path = tmp_path / f"tone{extension}"
    try:
        soundfile.write(path, synthesize("drone", 1, rate, seed=7), rate, format=fmt, subtype=subtype)
    except (soundfile.LibsndfileError, RuntimeError, ValueError) as e:
        pytest.skip(f"{fmt}: libsndfile reads it but cannot write it here ({e})")
    audio = load_audio(path, 22050)
    assert audio.dtype == np.float32 and np.abs(audio).max() > 0.01
    if fmt != "XI":  # an instrument sample; its header keeps no sample rate
        assert abs(len(audio) - 22050) <= 1200


def _ffmpeg_encoded(container: str, codec: str, seconds: float = 1.0) -> bytes:
    """A stereo tone encoded by PyAV's own FFmpeg, as a phone or a browser would write it."""
    rate = 48000 if codec == "libopus" else 44100
    t = np.arange(int(seconds * rate)) / rate
    planes = (0.3 * np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)])).astype(np.float32)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="stereo")
        stream.bit_rate = 96000
        frame = av.AudioFrame.from_ndarray(planes, format="fltp", layout="stereo")
        frame.sample_rate = rate
        fitted = av.AudioResampler(format=stream.codec_context.format.name, layout="stereo", rate=rate,
                                   frame_size=stream.codec_context.frame_size or None)
        for part in [*fitted.resample(frame), *fitted.resample(None), None]:
            for packet in stream.encode(part):
                out.mux(packet)
    return buffer.getvalue()


FFMPEG_FORMATS = {".m4a": ("ipod", "aac"), ".aac": ("adts", "aac"), ".mp4": ("mp4", "aac"),
                  ".webm": ("webm", "libopus"), ".mkv": ("matroska", "aac"), ".wma": ("asf", "wmav2")}


@pytest.mark.parametrize("extension", list(FFMPEG_FORMATS))
def test_aac_wma_and_the_audio_of_video_containers_decode_through_pyav(extension, tmp_path):
    data = _ffmpeg_encoded(*FFMPEG_FORMATS[extension])
    path = tmp_path / f"phone recording{extension}"
    path.write_bytes(data)
    assert extension in AUDIO_EXTENSIONS
    audio = load_audio(path, 22050)
    np.testing.assert_array_equal(audio, load_audio(data, 22050, source=f"row{extension}"))
    assert abs(len(audio) - 22050) <= 2400  # AAC and Opus pad a frame or two
    # the mono mix of two tones of amplitude 0.3: rms 0.3 / 2 after mixing (two sines at 0.15 each)
    assert np.sqrt(np.mean(audio[2000:-2000] ** 2)) == pytest.approx(0.15, rel=0.1)


def test_a_dataset_row_without_a_file_name_is_tried_with_ffmpeg():
    audio = load_audio(_ffmpeg_encoded("ipod", "aac"), 22050, source="dataset.parquet#row-3")
    assert abs(len(audio) - 22050) <= 2400


def test_ffmpeg_files_are_bounded_as_libsndfile_files_are():
    data = _ffmpeg_encoded("ipod", "aac", seconds=3)
    with pytest.raises(BadAudioError, match="longer than --max-seconds 2 "):  # from the header, before decoding
        load_audio(data, 22050, source="long.m4a", max_seconds=2)
    for bad in (b"", data[:100], b"not audio at all" * 100):
        with pytest.raises(BadAudioError, match="^broken.m4a: "):
            load_audio(bad, 22050, source="broken.m4a")

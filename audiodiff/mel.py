"""Audio <-> mel-spectrogram images, batched, in torch; reproduces diffusers' `Mel` (librosa).

Pure tensor code: no I/O, no Ray. `MelConfig` reads and writes diffusers' `mel_config.json`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math

import numpy as np
import torch
import torchaudio

from audiodiff.errors import AudiodiffError

_AMIN = 1e-10  # librosa.power_to_db's floor
# Multiplicative NNLS refinements after the pseudo-inverse: 5 bring the re-encoded image closer to the
# input than librosa's L-BFGS-B NNLS does (measured in tests/test_mel.py), at a fraction of its cost.
_NNLS_ITERATIONS = 5
_GRIFFIN_LIM_MOMENTUM = 0.99
_PHASE_SEED = 0
# Each mel band is a triangle over a few neighbouring STFT bins, so the filter bank is over 99% zeros. On one CPU
# thread the forward product runs over groups of this many bands, each against only the bins the group covers: 28x
# fewer multiply-adds at 256 bands (7x at 64), the same sums up to float rounding order (BENCHMARKS.md, "Mel codec").
_BANDS_PER_GROUP = 8
# What a mel config may ask for: teticio's numbers lie well inside, and the largest cost little (a mel basis of
# 1024 x 8193 floats, 32 MiB; 1000 Griffin-Lim iterations, 30x the default). Without upper bounds one line of
# mel_config.json asked every actor for a 137 GB basis (n_fft 2^28) or a vocoder that never ends (n_iter 1e9).
MEL_BOUNDS = {"x_res": (8, 4096), "y_res": (8, 1024), "sample_rate": (1000, 192_000), "n_fft": (16, 16384),
              "hop_length": (1, 16384), "top_db": (1, 200), "n_iter": (1, 1000)}
MAX_SLICE_SAMPLES = 1 << 21  # x_res * hop_length: one image's audio, 95 s at 22050 Hz (16x teticio's)


def _check_mel_values(values: dict, source: str) -> None:
    for name, (low, high) in MEL_BOUNDS.items():
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise AudiodiffError(f"{source}: {name} must be a positive integer, got {value!r}")
        if not low <= value <= high:
            raise AudiodiffError(f"{source}: {name} {value} is outside {low}..{high}; give a value in that range")
    if values["x_res"] * values["hop_length"] > MAX_SLICE_SAMPLES:
        raise AudiodiffError(f"{source}: x_res {values['x_res']} x hop_length {values['hop_length']} is "
                             f"{values['x_res'] * values['hop_length']} samples per image, over {MAX_SLICE_SAMPLES}; "
                             "make the image narrower or the hop shorter")


@dataclasses.dataclass(frozen=True)
class MelConfig:
    """The numbers of diffusers' `Mel`, with its defaults (teticio's 256x256 models)."""

    x_res: int = 256
    y_res: int = 256
    sample_rate: int = 22050
    n_fft: int = 2048
    hop_length: int = 512
    top_db: int = 80
    n_iter: int = 32

    def __post_init__(self):
        _check_mel_values(dataclasses.asdict(self), "mel config")

    @property
    def slice_size(self) -> int:
        """Samples in one image's worth of audio (as `Mel.slice_size`)."""
        return self.x_res * self.hop_length - 1

    def samples_for_width(self, width: int) -> int:
        """Samples that `images_to_audio` returns for an image `width` frames wide."""
        return self.hop_length * (width - 1)

    @property
    def edge_frames(self) -> int:
        """Frames at each end of an image whose centred STFT window reaches past the audio (into zero
        padding): they differ from the frames in the middle."""
        return math.ceil(self.n_fft / 2 / self.hop_length)

    def width_for_seconds(self, seconds: float) -> int:
        """Frames of the narrowest image whose audio lasts at least `seconds`."""
        return math.ceil(round(seconds * self.sample_rate, 6) / self.hop_length) + 1

    def frames_in(self, seconds: float) -> int:
        """Frames nearest to `seconds` of audio (a kept region, an overlap)."""
        return round(seconds * self.sample_rate / self.hop_length)

    @classmethod
    def from_dict(cls, values: dict, source: str = "mel config") -> MelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in values if k not in known and not k.startswith("_"))
        if unknown:
            raise AudiodiffError(f"{source}: unknown mel config keys {unknown}; expected some of {sorted(known)}")
        # diffusers writes top_db as an int, but older configs have 80.0
        given = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in values.items() if k in known}
        _check_mel_values({**dataclasses.asdict(cls()), **given}, source)
        return cls(**given)

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "mel_config.json") -> MelConfig:
        try:
            values = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
        except UnicodeDecodeError as e:
            raise AudiodiffError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start}); "
                                 "a mel_config.json is a JSON file") from None
        except json.JSONDecodeError as e:
            raise AudiodiffError(f"{source}: not valid JSON ({e})") from None
        if not isinstance(values, dict):
            raise AudiodiffError(f"{source}: expected a JSON object, got {type(values).__name__}")
        return cls.from_dict(values, source)

    def to_json(self) -> str:
        # the installed version, read without importing diffusers (seconds, at the start of every preprocess)
        values = {"_class_name": "Mel", "_diffusers_version": importlib.metadata.version("diffusers"),
                  **dataclasses.asdict(self)}
        return json.dumps(values, indent=2, sort_keys=True) + "\n"


SILENT = 255  # each image is scaled to its own loudest bin, so silence (all bins equal) is all white


def is_silent(images: torch.Tensor) -> torch.Tensor:
    """bool [batch]: which uint8 images [batch, height, width] are the image of silence (all white)."""
    return images.flatten(1).amin(dim=1) == SILENT


def _band_groups(basis: torch.Tensor, size: int) -> list[tuple[int, int, torch.Tensor]]:
    """A [n_mels, n_freqs] filter bank as (first bin, last bin + 1, weights [bands, bins]) per group of `size`
    consecutive bands: the groups' rows, stacked, are the bank with the zeros outside each group's bins left out.
    A group whose bands are all empty (more bands than bins can fill) keeps one bin of zeros."""
    groups = []
    for start in range(0, basis.shape[0], size):
        rows = basis[start:start + size]
        used = rows.ne(0).any(dim=0).nonzero().flatten().tolist() or [0]
        first, last = used[0], used[-1] + 1
        groups.append((first, last, rows[:, first:last].contiguous()))
    return groups


class MelCodec:
    """Batched mel codec on one device.

    `audio_to_images`: power mel spectrogram (centred STFT, zero padding, periodic Hann, Slaney scale and
    norm), dB relative to each slice's maximum, clipped to `top_db`, scaled to uint8 as `Mel` does.
    `images_to_audio`: dB -> power, inverse mel (pseudo-inverse refined by NNLS updates), Griffin-Lim.
    """

    def __init__(self, config: MelConfig, device: str | torch.device = "cpu", slices_per_batch: int = 32):
        self.config = config
        self.device = torch.device(device)
        self.slices_per_batch = slices_per_batch
        c = config
        self._window = torch.hann_window(c.n_fft, periodic=True, device=self.device)
        fbanks = torchaudio.functional.melscale_fbanks(
            n_freqs=c.n_fft // 2 + 1, f_min=0.0, f_max=c.sample_rate / 2, n_mels=c.y_res,
            sample_rate=c.sample_rate, norm="slaney", mel_scale="slaney",
        )
        self._mel_basis = fbanks.T.contiguous().to(self.device)  # [n_mels, n_freqs]
        self._mel_pinv = torch.linalg.pinv(fbanks.T).to(self.device)  # [n_freqs, n_mels]
        # on an accelerator one dense product is faster than many small ones
        self._band_groups = _band_groups(self._mel_basis, _BANDS_PER_GROUP) if self.device.type == "cpu" else None

    def _stft(self, audio: torch.Tensor) -> torch.Tensor:
        c = self.config
        return torch.stft(audio, c.n_fft, c.hop_length, window=self._window, center=True,
                          pad_mode="constant", return_complex=True)

    def _istft(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        c = self.config
        return torch.istft(spec, c.n_fft, c.hop_length, window=self._window, center=True, length=length)

    # audio -> images

    def audio_to_images(self, waveform: torch.Tensor | np.ndarray) -> torch.Tensor:
        """All full slices of a mono waveform at `sample_rate` -> uint8 [n_slices, y_res, x_res] (on CPU).

        Audio shorter than one image is zero-padded to `x_res * hop_length` samples, as `Mel.load_audio` does.
        """
        audio = torch.as_tensor(waveform, dtype=torch.float32)
        if audio.ndim != 1:
            raise ValueError(f"audio_to_images takes mono audio of shape [samples], got {tuple(audio.shape)}")
        c = self.config
        if audio.numel() < c.x_res * c.hop_length:
            audio = torch.nn.functional.pad(audio, (0, c.x_res * c.hop_length - audio.numel()))
        n_slices = audio.numel() // c.slice_size
        slices = audio[: n_slices * c.slice_size].reshape(n_slices, c.slice_size)
        return torch.cat([self._slices_to_images(chunk.to(self.device)).cpu()
                          for chunk in slices.split(self.slices_per_batch)])

    def _slices_to_images(self, slices: torch.Tensor) -> torch.Tensor:
        c = self.config
        spec = self._stft(slices)
        power = spec.real.square() + spec.imag.square()  # 3x cheaper than abs().square() on CPU
        mel = self._to_mel(power)  # [batch, n_mels, frames]
        db = 10.0 * torch.log10(mel.clamp_min(_AMIN))
        db = db - 10.0 * torch.log10(mel.amax(dim=(1, 2), keepdim=True).clamp_min(_AMIN))
        db = torch.maximum(db, db.amax(dim=(1, 2), keepdim=True) - c.top_db)
        return ((db + c.top_db) * (255.0 / c.top_db)).clamp(0, 255).add(0.5).to(torch.uint8)

    def _to_mel(self, power: torch.Tensor) -> torch.Tensor:
        """[batch, n_freqs, frames] power -> [batch, n_mels, frames]: `mel_basis @ power`.

        By band groups on one thread (as preprocess workers run). With more threads, one dense product: each small
        product is a parallel region of its own, and where the threads wait for cores others use, 32 of them took
        as long as the dense product (measured on a loaded 2-core machine)."""
        if self._band_groups is None or torch.get_num_threads() > 1:
            return torch.matmul(self._mel_basis, power)
        return torch.cat([torch.matmul(weights, power[:, first:last]) for first, last, weights in self._band_groups],
                         dim=1)

    # images -> audio

    def images_to_audio(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 [batch, y_res, width] -> float32 [batch, hop_length * (width - 1)] on the codec's device.

        Deterministic: the Griffin-Lim phase starts from a fixed random draw that depends only on the image
        size, so an image gives the same audio alone or in any batch. An image wider than `vocoder_window`
        frames is vocoded window by window (`_vocode_in_windows`), so memory beyond the audio returned does not
        grow with the width; standard and 4x-extended images fit in one window.
        """
        if isinstance(images, np.ndarray) and not images.flags.writeable:
            images = images.copy()  # Ray Data hands read-only blocks, on which torch warns in every worker's log
        images = torch.as_tensor(images)
        c = self.config
        if images.ndim != 3 or images.dtype != torch.uint8 or images.shape[1] != c.y_res:
            raise ValueError(f"images_to_audio takes uint8 [batch, {c.y_res}, width], "
                             f"got {images.dtype} {tuple(images.shape)}")
        if images.shape[-1] <= self.vocoder_window:
            return self._vocode(images)[0]
        return self._vocode_in_windows(images)

    @property
    def vocoder_window(self) -> int:
        """Frames vocoded at once: 4 images wide (a 4x-extended clip), and wide enough that its overlap with the
        next window (an eighth) holds more than the frames at both ends that zero padding disturbs."""
        return max(4 * self.config.x_res, 16 * self.config.edge_frames + 16)

    def _vocode(self, images: torch.Tensor, start_angles: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images -> (audio, Griffin-Lim's last phase [batch, n_freqs, width] as unit complex numbers)."""
        c = self.config
        db = images.to(self.device, torch.float32) * (c.top_db / 255.0) - c.top_db
        mel_power = torch.pow(10.0, db / 10.0)
        return self._griffin_lim(self._mel_to_stft_power(mel_power).sqrt(), start_angles)

    def _vocode_in_windows(self, images: torch.Tensor) -> torch.Tensor:
        """A wide image in windows of `vocoder_window` frames that overlap by an eighth: each window's phase
        starts, on the overlap, from where the window before ended, and the two are cross-faded (raised cosine)
        over the overlap less the frames at either window's end, whose STFT reaches into zero padding."""
        c = self.config
        width, window = images.shape[-1], self.vocoder_window
        overlap, edge, hop = window // 8, c.edge_frames, c.hop_length
        out = torch.zeros(images.shape[0], c.samples_for_width(width), device=self.device)
        start, end, angles = 0, 0, None
        while end < width:
            previous_end, start = end, max(0, end - overlap)
            end = min(start + window, width)
            audio, last = self._vocode(images[..., start:end], angles)
            offset = start * hop
            if previous_end == 0:
                out[:, :audio.shape[-1]] = audio
            else:
                fade_start, fade_end = (start + edge) * hop, (previous_end - 1 - edge) * hop
                ramp = torch.sin(torch.linspace(0, math.pi / 2, fade_end - fade_start, device=self.device)) ** 2
                ours = audio[:, fade_start - offset:fade_end - offset]
                out[:, fade_start:fade_end] = out[:, fade_start:fade_end] * (1 - ramp) + ours * ramp
                out[:, fade_end:offset + audio.shape[-1]] = audio[:, fade_end - offset:]
            angles = last[..., end - overlap - start:]
        return out

    def _mel_to_stft_power(self, mel_power: torch.Tensor) -> torch.Tensor:
        """Non-negative least squares for `mel_basis @ x = mel_power`, per frame, batched."""
        basis = self._mel_basis
        estimate = torch.matmul(self._mel_pinv, mel_power).clamp_min(0)
        numerator = torch.matmul(basis.T, mel_power)
        for _ in range(_NNLS_ITERATIONS):
            estimate = estimate * numerator / (torch.matmul(basis.T, torch.matmul(basis, estimate)) + _AMIN)
        return estimate

    def _griffin_lim(self, magnitude: torch.Tensor, start_angles: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Magnitudes [batch, n_freqs, frames] -> (audio, the last phase). The phase starts from the fixed draw,
        its first frames from `start_angles` where given (the end of the window before)."""
        c = self.config
        n_freqs, n_frames = magnitude.shape[-2:]
        length = c.samples_for_width(n_frames)
        generator = torch.Generator().manual_seed(_PHASE_SEED)
        phase = torch.rand(n_freqs, n_frames, generator=generator).to(self.device)
        angles = torch.polar(torch.ones_like(phase), 2 * math.pi * phase).expand_as(magnitude)
        if start_angles is not None:
            angles = angles.clone()
            angles[..., :start_angles.shape[-1]] = start_angles
        rebuilt = torch.zeros((), dtype=angles.dtype, device=self.device)
        momentum = _GRIFFIN_LIM_MOMENTUM / (1 + _GRIFFIN_LIM_MOMENTUM)
        for _ in range(c.n_iter):
            previous = rebuilt
            rebuilt = self._stft(self._istft(magnitude * angles, length))
            angles = rebuilt - momentum * previous
            angles = angles / (angles.abs() + 1e-16)
        return self._istft(magnitude * angles, length), angles

"""Quality figures of generated audio: pure numpy/torch, no Ray and no I/O, so the fine-tune loop, `evaluate`
and a notebook compute the same numbers.

- `mel_embedding`: mel images -> one vector per window of 16 frames (the built-in embedding);
- `frechet_distance` of the vectors' Gaussians (`embedding_statistics`), as FID and FAD: 0 for equal
  statistics, larger is worse, biased upwards with few vectors;
- `kernel_distance`: the unbiased squared MMD with a Gaussian kernel, as the Kernel Audio Distance
  (arXiv 2502.15602): about 0 (either sign) for two draws of one distribution at any sample size;
- `halves`: a set split in two, by track where tracks are known, for the floor of a figure (the reference
  against itself).
"""

from __future__ import annotations

import numpy as np
import torch

from audiodiff.mel import MelConfig

# The built-in embedding (see `mel_embedding`): levels in 32 bands, texture and onsets in 16, per window of
# 16 frames (0.37 s at 22050 Hz, hop 512: a note or a beat).
LEVEL_BANDS = 32
DYNAMICS_BANDS = 16
WINDOW_FRAMES = 16
MEL_DIM = LEVEL_BANDS + 2 * DYNAMICS_BANDS


def mel_embedding(images: torch.Tensor | np.ndarray, config: MelConfig) -> np.ndarray:
    """uint8 mel images [batch, y_res, width] (as the models make them and `MelCodec.audio_to_images` cuts
    them) -> float32 vectors [batch * (width // 16), 64], one per window of 16 frames, image by image.

    Per window, in dB below the image's loudest bin (what the image's grey levels encode, so a clip's
    loudness does not matter):
    - the mean level in 32 bands of equal mel width: the spectral envelope (timbre, register, noise vs tones);
    - the level's standard deviation over the window in 16 bands: texture (steady drone vs moving notes);
    - the mean rise from frame to frame in 16 bands (spectral flux): onsets (drums, plucked notes).
    These are the hand-made features music-genre classification started from (envelope, texture windows,
    flux), so they tell apart what a listener would: white noise is loud and flat in every band, silence is
    one level everywhere, a drone is steady in a few low bands, beats rise sharply in the low and the noise
    bands, an arpeggio in its note's harmonics. The bands are pooled from the image's mel bins, so 64-bin
    (tiny) and 256-bin (full) images land in one space (near, not on, each other: shorter slices and wider
    filters shift the levels a little); 64 dimensions keep the covariance estimable from a few hundred
    vectors. Distances come out in dB squared. Needs no trained weights.
    """
    images = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))  # may be read-only
    if images.ndim != 3 or images.shape[1] != config.y_res:
        raise ValueError(f"mel_embedding takes images [batch, {config.y_res}, width], got {tuple(images.shape)}")
    db = images.float() * (config.top_db / 255.0) - config.top_db
    window = min(WINDOW_FRAMES, db.shape[-1])
    windows = db.shape[-1] // window

    def bands(count: int) -> torch.Tensor:  # [batch, count, windows, window]
        pooled = torch.nn.functional.adaptive_avg_pool2d(db[:, None], (count, db.shape[-1]))[:, 0]
        return pooled[..., :windows * window].unflatten(-1, (windows, window))

    coarse = bands(DYNAMICS_BANDS)
    features = torch.cat([bands(LEVEL_BANDS).mean(-1), coarse.std(-1, correction=0),
                          coarse.diff(dim=-1).clamp_min(0).mean(-1)], dim=1)  # [batch, 64, windows]
    return features.transpose(1, 2).reshape(-1, features.shape[1]).cpu().numpy()


def embedding_statistics(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectors [n, dim] -> their mean [dim] and covariance [dim, dim], in float64."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2 or len(vectors) < 2:
        raise ValueError(f"embedding_statistics needs at least 2 vectors [n, dim], got shape {vectors.shape}")
    return vectors.mean(axis=0), np.cov(vectors, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Fréchet distance between two Gaussians: |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2).

    The trace of the square root is taken through symmetric eigen decompositions, of S1 and then of
    S1^1/2 S2 S1^1/2 (which has the eigenvalues of S1 S2), with eigenvalues clamped at 0: exact for the
    rank-deficient covariances of fewer vectors than dimensions, where the usual scipy `sqrtm` of S1 S2 goes
    complex or unstable. Rounding can leave a hair below 0 for equal statistics; the result is at least 0.
    """
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    product = root1 @ sigma2 @ root1
    trace_root = np.sqrt(np.linalg.eigvalsh((product + product.T) / 2).clip(min=0)).sum()
    distance = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root
    return max(float(distance), 0.0)


MAX_BANDWIDTH_VECTORS = 2000  # the median heuristic's sample: its median is stable long before this
KERNEL_BLOCK = 2048  # rows of the kernel matrix at a time: 2048 x n float64, bounded memory for any n


def median_bandwidth(vectors: np.ndarray) -> float:
    """The median heuristic: the median Euclidean distance between distinct vectors (of at most
    MAX_BANDWIDTH_VECTORS of them, drawn with a fixed seed, so the figure is reproducible)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if len(vectors) > MAX_BANDWIDTH_VECTORS:
        vectors = vectors[np.random.default_rng(0).choice(len(vectors), MAX_BANDWIDTH_VECTORS, replace=False)]
    squared = _squared_distances(vectors, vectors)[np.triu_indices(len(vectors), k=1)]
    bandwidth = float(np.median(np.sqrt(squared)))
    return bandwidth if bandwidth > 0 else 1.0  # identical vectors: any scale gives the same 0


def _squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.maximum((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T, 0.0)


def _kernel_sum(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    """The sum of k(x_i, y_j) over all pairs, block by block."""
    return sum(float(np.exp(_squared_distances(x[start:start + KERNEL_BLOCK], y) / (-2 * bandwidth ** 2)).sum())
               for start in range(0, len(x), KERNEL_BLOCK))


def _within_mean(x: np.ndarray, groups: np.ndarray | None, bandwidth: float) -> float:
    """The mean of k(x_i, x_j) over the pairs of different groups (each vector its own group by default, and
    where there is one group only)."""
    if groups is None or len(set(groups)) < 2:
        return (_kernel_sum(x, x, bandwidth) - len(x)) / (len(x) * (len(x) - 1))  # less the diagonal, k(x, x) = 1
    groups = np.asarray(groups)
    members = [x[groups == g] for g in np.unique(groups)]
    same = sum(_kernel_sum(m, m, bandwidth) for m in members)
    pairs = len(x) ** 2 - sum(len(m) ** 2 for m in members)
    return (_kernel_sum(x, x, bandwidth) - same) / pairs


def kernel_distance(clips: np.ndarray, reference: np.ndarray, bandwidth: float | None = None,
                    clip_groups: np.ndarray | None = None, reference_groups: np.ndarray | None = None) -> float:
    """The unbiased estimate of the squared maximum mean discrepancy between the vectors' distributions, with
    the Gaussian kernel k(a, b) = exp(-|a - b|^2 / 2 bandwidth^2), as the Kernel Audio Distance:

        mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(x_i, y_j)

    The Gaussian kernel is characteristic (the population figure is 0 only for equal distributions, where KID's
    cubic polynomial kernel matches three moments only) and needs no assumption on the distribution, where the
    Fréchet distance fits Gaussians. The bandwidth defaults to the median heuristic on the reference
    (`median_bandwidth`), so every set of clips scored against one reference is scored with one kernel.
    Unbiased: two draws of one distribution give 0 on average at any number of vectors (single draws scatter
    around it, below 0 too), so few clips give a usable figure where Fréchet's is biased upwards. At most 2;
    unitless. The windows of one track are not independent draws (two of one track are nearer than two of two
    tracks), so with `clip_groups` / `reference_groups` (a track or clip per vector) the within-set means leave
    out the pairs of one group: then the estimate is unbiased for tracks drawn independently.
    """
    x, y = (np.asarray(a, dtype=np.float64) for a in (clips, reference))
    if x.ndim != 2 or y.ndim != 2 or len(x) < 2 or len(y) < 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"kernel_distance needs two sets of at least 2 vectors [n, dim], got {x.shape} and {y.shape}")
    bandwidth = median_bandwidth(y) if bandwidth is None else bandwidth
    return (_within_mean(x, clip_groups, bandwidth) + _within_mean(y, reference_groups, bandwidth)
            - 2 * _kernel_sum(x, y, bandwidth) / (len(x) * len(y)))


def distances(clips: np.ndarray, reference: np.ndarray, bandwidth: float | None = None,
              clip_groups: np.ndarray | None = None, reference_groups: np.ndarray | None = None) -> dict[str, float]:
    """Both figures of two sets of vectors: {"frechet_distance", "kernel_distance"} (`kernel_distance`'s
    arguments)."""
    return {"frechet_distance": frechet_distance(*embedding_statistics(clips), *embedding_statistics(reference)),
            "kernel_distance": kernel_distance(clips, reference, bandwidth, clip_groups, reference_groups)}


def halves(count: int, tracks: np.ndarray | None = None) -> np.ndarray | None:
    """A set of `count` vectors split in two for its floor, as a mask of the first half: by track (sorted tracks
    taken in turn), so no track's windows land on both sides, where there are at least 2 tracks; else the
    vectors taken in turn. None when a half would have fewer than 2 vectors."""
    if tracks is not None and len(set(tracks)) >= 2:
        order = {track: i for i, track in enumerate(sorted(set(tracks)))}
        first = np.array([order[t] % 2 == 0 for t in tracks])
    else:
        first = np.arange(count) % 2 == 0
    return None if first.sum() < 2 or (~first).sum() < 2 else first

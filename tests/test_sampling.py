import types

import pytest
import torch
from diffusers import DDIMScheduler

from audiodiff import models, sampling
from audiodiff.errors import AudiodiffError


@pytest.fixture(scope="module")
def tiny():
    parts = models.new_model("tiny")
    return parts.unet.eval(), models.make_scheduler("ddim", parts)


def generators(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def start_images(n, width=64):
    return torch.randint(0, 256, (n, 64, width), generator=torch.Generator().manual_seed(7), dtype=torch.uint8)


def test_a_batch_agrees_with_the_same_items_one_by_one(tiny):
    unet, scheduler = tiny
    batch = sampling.sample(unet, scheduler, generators(1, 2, 3), 64, 64, 4).int()
    alone = torch.cat([sampling.sample(unet, scheduler, generators(s), 64, 64, 4) for s in (1, 2, 3)]).int()
    difference = (batch - alone).abs()
    # the same noise and draws per item; batched float kernels only round differently (a grey level at most)
    assert difference.max() <= 1 and (difference > 0).float().mean() < 0.005
    assert not torch.equal(batch[0], batch[1])


def test_strength_zero_returns_the_input_and_one_ignores_it(tiny):
    unet, scheduler = tiny
    start = start_images(2)
    assert torch.equal(sampling.sample(unet, scheduler, generators(1, 2), 64, 64, 4, start=start, strength=0.0), start)
    from_noise = sampling.sample(unet, scheduler, generators(1, 2), 64, 64, 4)
    ignored = sampling.sample(unet, scheduler, generators(1, 2), 64, 64, 4, start=start, strength=1.0)
    assert torch.equal(from_noise, ignored)
    halfway = sampling.sample(unet, scheduler, generators(1, 2), 64, 64, 4, start=start, strength=0.5)
    assert not torch.equal(halfway, start) and not torch.equal(halfway, from_noise)


def test_kept_frames_equal_the_input_per_item(tiny):
    unet, scheduler = tiny
    start = start_images(2, width=128)
    keep = torch.zeros(2, 128, dtype=torch.bool)
    keep[0, :32] = True  # outpainting: keep the start
    keep[1, 96:] = True  # keep the end
    out = sampling.sample(unet, scheduler, generators(1, 2), 64, 128, 4, start=start, strength=1.0, keep=keep)
    assert torch.equal(out[0, :, :32], start[0, :, :32]) and torch.equal(out[1, :, 96:], start[1, :, 96:])
    assert not torch.equal(out[0, :, 32:], start[0, :, 32:])


def test_bad_options_are_named(tiny):
    unet, scheduler = tiny
    with pytest.raises(AudiodiffError, match=r"strength must lie in \[0, 1\], got 1.5"):
        sampling.sample(unet, scheduler, generators(1), 64, 64, 4, start=start_images(1), strength=1.5)
    with pytest.raises(AudiodiffError, match="frames can be kept only from a start image"):
        sampling.sample(unet, scheduler, generators(1), 64, 64, 4, keep=torch.ones(64, dtype=torch.bool))


class GaussianDenoiser(torch.nn.Module):
    """The exact noise prediction for data drawn from N(0, spread^2): what a perfectly trained model of that
    data predicts. Its probability-flow ODE is a bijection, so DDIM inversion followed by DDIM sampling must
    come back to any input, up to the two discretisations."""

    def __init__(self, alphas_cumprod: torch.Tensor, spread: float):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod)
        self.spread = spread
        self.config = types.SimpleNamespace(in_channels=1)
        self.dtype = torch.float32

    def forward(self, sample, t):
        alpha = self.alphas_cumprod[t]
        return types.SimpleNamespace(sample=(1 - alpha) ** 0.5 * sample / (alpha * self.spread ** 2 + 1 - alpha))

    def parameters(self):
        yield self.alphas_cumprod


def test_ddim_inversion_comes_back_to_its_input(tiny):
    scheduler = DDIMScheduler.from_config(tiny[1].config, clip_sample=False)
    model = GaussianDenoiser(scheduler.alphas_cumprod, spread=0.6)  # uniform grey levels have a spread of 0.58
    images = start_images(3)
    noise = sampling.invert(model, scheduler, images, 50)
    assert noise.shape == (3, 1, 64, 64)
    back = sampling.sample(model, scheduler, generators(0, 0, 0), 64, 64, 50, noise=noise).int()
    difference = (back - images.int()).abs().float()
    # measured: 2.4 grey levels on average, 5 at most (of 255), the discretisation error of 50 steps
    assert difference.mean() < 3 and difference.max() <= 8
    from_other_noise = sampling.sample(model, scheduler, generators(0, 0, 0), 64, 64, 50).int()
    assert (from_other_noise - images.int()).abs().float().mean() > 30
    alone = sampling.invert(model, scheduler, images[1:2], 50)
    torch.testing.assert_close(alone[0], noise[1], rtol=0, atol=1e-5 * float(noise.abs().max()))


def test_slerp_ends_at_its_inputs_and_keeps_the_norm_of_noise():
    a, b = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sampling.slerp(a, b, 0.0), a)
    torch.testing.assert_close(sampling.slerp(a, b, 1.0), b)
    middle = sampling.slerp(a, b, 0.5)
    assert middle.norm() == pytest.approx(float(a.norm() + b.norm()) / 2, rel=0.02)
    assert (a + b).norm() / 2 < 0.8 * middle.norm()  # what a straight line would lose
    torch.testing.assert_close(sampling.slerp(a, a, 0.3), a)


def test_continued_images_are_as_wide_as_asked_and_begin_with_the_first_window(tiny):
    unet, scheduler = tiny
    first = start_images(2)
    wide = sampling.continue_images(unet, scheduler, generators(1, 2), 64, 64, 200, 16, 4, edge=2, first=first)
    assert wide.shape == (2, 64, 200) and wide.dtype == torch.uint8
    # the first window is the input, up to its end frames and the cross-fade into the second window
    assert torch.equal(wide[:, :, :64 - 2 - 8], first[:, :, :64 - 2 - 8])
    alone = sampling.continue_images(unet, scheduler, generators(2), 64, 64, 200, 16, 4, edge=2, first=first[1:])
    difference = (alone[0].int() - wide[1].int()).abs()
    assert difference.max() <= 1 and (difference > 0).float().mean() < 0.005  # batched rounding only
    from_noise = sampling.continue_images(unet, scheduler, generators(1), 64, 64, 100, 16, 4)
    assert from_noise.shape == (1, 64, 100)
    with pytest.raises(AudiodiffError, match="overlap must be at least one frame and shorter than the window"):
        sampling.continue_images(unet, scheduler, generators(1), 64, 64, 100, 60, 4, edge=2)


def test_joins_of_continued_images_change_no_more_than_anywhere_else(tiny):
    unet, scheduler = tiny
    wide = sampling.continue_images(unet, scheduler, generators(1, 2), 64, 64, 400, 16, 4, edge=2).float()
    change = (wide[:, :, 1:] - wide[:, :, :-1]).abs().mean(dim=1)  # change[:, j - 1]: from frame j - 1 to j
    joins = torch.arange(64 - 2, 400, 64 - 2 - 16)  # where each window's new frames begin
    around = torch.cat([torch.arange(j - 10, j + 1) for j in joins.tolist()])  # the cross-fade and the join
    # a seam would be a jump in the spectrogram: measured 2-3x the mean change at the joins without the
    # cross-fade and the end frames left out (the demo's model), about 1x with them
    assert change[:, around].mean() < 1.3 * change.mean()
    assert change[:, around].max() <= change.quantile(0.995)

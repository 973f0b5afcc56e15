import pytest
import torch

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

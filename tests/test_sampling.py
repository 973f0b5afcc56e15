import types

import pytest
import torch
from diffusers import DDIMScheduler
from torch.utils._python_dispatch import TorchDispatchMode

from audiodiff import models, sampling
from audiodiff.errors import AudiodiffError

# every sampler, and those that take Karras sigmas with them too
CASES = ([(name, False) for name in sampling.SAMPLERS]
         + [(name, True) for name, s in sampling.SAMPLERS.items() if s.karras])
# (DDIM with eta 0)
DETERMINISTIC = ["ddim", "dpm-solver", "unipc", "heun"]


def case_id(case):
    return sampling.scheduler_label(*case)


@pytest.fixture(scope="module")
def parts():
    return models.new_model("tiny")


@pytest.fixture(scope="module")
def tiny(parts):
    return parts.unet.eval(), sampling.make_scheduler("ddim", parts.scheduler.config)


@pytest.fixture(params=CASES, ids=case_id)
def each(request, parts):
    """The tiny UNet with each sampler (DDIM with eta 1, so that it draws noise too)."""
    name, karras = request.param
    return parts.unet.eval(), sampling.make_scheduler(name, parts.scheduler.config, karras)


def generators(*seeds):
    return sampling.generators(list(seeds))


def start_images(n, width=64):
    return torch.randint(0, 256, (n, 64, width), generator=torch.Generator().manual_seed(7), dtype=torch.uint8)


def assert_batch_rounding_only(a, b):
    difference = (a.int() - b.int()).abs()
    # the same noise and draws per item; batched float kernels only round differently (a grey level at most)
    assert difference.max() <= 1 and (difference > 0).float().mean() < 0.005


def test_a_batch_agrees_with_the_same_items_one_by_one(each):
    unet, scheduler = each
    batch = sampling.sample(unet, scheduler, generators(1, 2, 3), 64, 64, 4, eta=1.0)
    alone = torch.cat([sampling.sample(unet, scheduler, generators(s), 64, 64, 4, eta=1.0) for s in (1, 2, 3)])
    assert_batch_rounding_only(batch, alone)
    assert not torch.equal(batch[0], batch[1])


def test_strength_zero_returns_the_input_and_one_ignores_it(each):
    unet, scheduler = each
    start = start_images(2)
    assert torch.equal(sampling.sample(unet, scheduler, generators(1, 2), 64, 64, 4, start=start, strength=0.0), start)
    from_noise = sampling.sample(unet, scheduler, generators(1, 2), 64, 64, 4)
    ignored = sampling.sample(unet, scheduler, generators(1, 2), 64, 64, 4, start=start, strength=1.0)
    assert torch.equal(from_noise, ignored)
    halfway = sampling.sample(unet, scheduler, generators(1, 2), 64, 64, 4, start=start, strength=0.5)
    assert not torch.equal(halfway, start) and not torch.equal(halfway, from_noise)


def test_kept_frames_equal_the_input_per_item(each):
    unet, scheduler = each
    start = start_images(2, width=128)
    keep = torch.zeros(2, 128, dtype=torch.bool)
    keep[0, :32] = True  # outpainting: keep the start
    keep[1, 96:] = True  # keep the end
    out = sampling.sample(unet, scheduler, generators(1, 2), 64, 128, 4, start=start, strength=1.0, keep=keep)
    assert torch.equal(out[0, :, :32], start[0, :, :32]) and torch.equal(out[1, :, 96:], start[1, :, 96:])
    assert not torch.equal(out[0, :, 32:], start[0, :, 32:])
    alone = sampling.sample(unet, scheduler, generators(2), 64, 128, 4, start=start[1:], strength=1.0, keep=keep[1:])
    assert_batch_rounding_only(out[1:], alone)


class Oracle(torch.nn.Module):
    """Predicts the exact noise of `clean` (model space) under the schedule `alphas_cumprod`: a model that
    knows the answer. From it, a deterministic sampler's latents are, after every step, `clean` and the
    starting noise mixed at exactly that step's noise level; `inputs` records what it was given."""

    def __init__(self, alphas_cumprod: torch.Tensor, clean: torch.Tensor):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod)
        self.clean = clean
        self.config = types.SimpleNamespace(in_channels=1)
        self.dtype = torch.float32
        self.inputs = []

    def forward(self, sample, t):
        self.inputs.append(sample.clone())
        sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5  # Heun's timesteps fall between
        low = t.floor().long().clamp(max=len(sigmas) - 2)
        sigma = torch.lerp(sigmas[low], sigmas[low + 1], t - low)
        alpha = 1 / (1 + sigma ** 2)  # (the input is scaled to variance-preserving form)
        return types.SimpleNamespace(sample=(sample - alpha ** 0.5 * self.clean) / (1 - alpha) ** 0.5)

    def parameters(self):
        yield self.alphas_cumprod


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_kept_frames_are_renoised_to_the_noise_level_of_each_step(parts, name):
    scheduler = sampling.make_scheduler(name, parts.scheduler.config)
    start = start_images(1)
    oracle = Oracle(DDIMScheduler.from_config(parts.scheduler.config).alphas_cumprod, sampling.to_model_space(start))
    sampling.sample(oracle, scheduler, generators(5), 64, 64, 6, start=start, strength=0.7)
    free = oracle.inputs
    oracle.inputs = []
    keep = torch.arange(64) < 24
    sampling.sample(oracle, scheduler, generators(5), 64, 64, 6, start=start, strength=0.7, keep=keep)
    # the generated frames follow the exact path; kept frames re-noised at the wrong level would stand out
    assert len(free) == len(oracle.inputs) >= 4
    for unkept, kept in zip(free, oracle.inputs):
        torch.testing.assert_close(kept, unkept, rtol=0, atol=1e-4)


def test_guidance_works_with_every_sampler(each):
    unet = models.new_model("tiny", conditional=True).unet.eval()
    scheduler = each[1]
    encoding, null = torch.randn(2, 1, 32, generator=torch.Generator().manual_seed(3)).chunk(2)
    options = {"encoding": encoding, "null_encoding": null}
    guided = sampling.sample(unet, scheduler, generators(1, 2), 64, 64, 3, guidance=3.0, **options)
    alone = sampling.sample(unet, scheduler, generators(2), 64, 64, 3, guidance=3.0, **options)
    assert_batch_rounding_only(guided[1:], alone)
    assert not torch.equal(guided, sampling.sample(unet, scheduler, generators(1, 2), 64, 64, 3, **options))


class HostReads(TorchDispatchMode):
    """Records the copies from the host to the meta device, which stands in for an accelerator here: a meta
    tensor holds no values, so any read of one on the host (.item(), .cpu(), `if tensor`) fails outright."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            source = args[1] if func is torch.ops.aten.copy_.default else args[0]
            if source.device.type == "cpu" and out.device.type == "meta":
                self.copies.append(tuple(source.shape))
        return out


def test_no_host_device_sync_inside_the_loop(each, parts):
    unet = models.new_model("tiny").unet.eval().to("meta")
    scheduler = each[1]
    with pytest.raises(RuntimeError):
        torch.zeros(1, device="meta").item()  # what a value read inside the loop would do
    copies = []
    for steps in (3, 6):
        with HostReads() as reads:
            images = sampling.sample(unet, scheduler, generators(1, 2), 64, 64, steps, eta=1.0, start=start_images(2),
                                     strength=0.9, keep=torch.arange(64) < 8)
        assert images.device.type == "meta"
        # the step noise of CPU generators is copied at each step; on a GPU, sampling.generators are on it
        copies.append(len([shape for shape in reads.copies if shape != (2, 1, 64, 64)]))
    # as many copies (tables made once, their length the steps') for a loop of 6 steps as for one of 3: none per step
    assert copies[0] == copies[1]


def test_unet_evaluations_count_heun_twice_and_guidance_twice(parts):
    heun = sampling.make_scheduler("heun", parts.scheduler.config)
    assert sampling.unet_evaluations(heun, 10) == 19
    assert sampling.unet_evaluations(heun, 10, guided=True) == 38
    assert sampling.unet_evaluations(heun, 10, strength=0.5) == 9  # the last 5 steps: two each but the last
    assert sampling.unet_evaluations(sampling.make_scheduler("dpm-solver", parts.scheduler.config), 10, 0.5) == 5


def test_samplers_keep_the_models_schedule(parts):
    config = {**parts.scheduler.config, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    for name in sampling.SAMPLERS:
        made = sampling.make_scheduler(name, config)
        assert (made.config.beta_end, made.config.beta_schedule) == (0.012, "scaled_linear"), name
    assert sampling.make_scheduler("dpm-solver-sde", config).config.algorithm_type == "sde-dpmsolver++"


def test_bad_options_are_named(tiny, parts):
    unet, scheduler = tiny
    with pytest.raises(AudiodiffError, match=r"strength must lie in \[0, 1\], got 1.5"):
        sampling.sample(unet, scheduler, generators(1), 64, 64, 4, start=start_images(1), strength=1.5)
    with pytest.raises(AudiodiffError, match="frames can be kept only from a start image"):
        sampling.sample(unet, scheduler, generators(1), 64, 64, 4, keep=torch.ones(64, dtype=torch.bool))
    with pytest.raises(AudiodiffError, match="--scheduler must be one of ddpm, ddim, dpm-solver, .*, got 'pndm'"):
        sampling.make_scheduler("pndm", parts.scheduler.config)
    with pytest.raises(AudiodiffError, match="--karras: the euler-ancestral scheduler has no Karras sigmas"):
        sampling.make_scheduler("euler-ancestral", parts.scheduler.config, karras=True)


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

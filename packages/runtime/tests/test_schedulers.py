"""Sigma templates against diffusers and the authors' formulas; Euler/add_noise algebra; img2img; training; errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.schedulers import (
    LTX2_DISTILLED_SIGMAS,
    LTX2_STAGE2_SIGMAS,
    TEMPLATES,
    FlowMatchScheduler,
    flux1,
    flux2,
    flux2_empirical_mu,
    linear_mu,
    ltx2,
    qwen_image,
    qwen_image_lightning,
    wan,
    z_image,
)

FIXED_STEPS = {"ltx2_distilled": 8, "ltx2_stage2": 3}
SHIFTED = [name for name in TEMPLATES if name not in FIXED_STEPS]


def _diffusers_sigmas(n, config, mu=None, sigmas=None):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    grid = np.linspace(1.0, 1 / n, n) if sigmas is None else sigmas
    scheduler.set_timesteps(sigmas=grid, mu=mu)
    return scheduler.sigmas, scheduler.timesteps


def _assert_close(ours, ref, atol=1e-6):
    assert ours.shape == ref.shape
    assert (ours.double() - ref.double()).abs().max().item() <= atol


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parity
@pytest.mark.parametrize("n", [1, 4, 9, 50])
def test_z_image_matches_diffusers(n):
    # diffusers' ZImagePipeline: torch.linspace(1, 1/N, N) into the Z-Image scheduler config (shift 3, static).
    grid = torch.linspace(1.0, 1 / n, n).tolist()
    ref_sigmas, ref_timesteps = _diffusers_sigmas(n, {"shift": 3.0, "use_dynamic_shifting": False}, sigmas=grid)
    scheduler = FlowMatchScheduler("z_image")
    scheduler.set_timesteps(n)
    _assert_close(scheduler.sigmas, ref_sigmas)
    _assert_close(scheduler.timesteps, ref_timesteps, atol=1e-3)


@pytest.mark.parity
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_img2img_euler_loop_matches_diffusers(strength):
    # diffusers' img2img: get_timesteps tail, scale_noise at the first kept timestep, then scheduler.step.
    diffusers = pytest.importorskip("diffusers")
    n = 7
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(sigmas=torch.linspace(1.0, 1 / n, n).tolist())
    start = int(max(n - min(n * strength, n), 0))
    ref.set_begin_index(start)
    gen = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)

    def velocity(x, sigma):
        return torch.tanh(x) * (1 + sigma)

    expected = ref.scale_noise(x0, ref.timesteps[start : start + 1], noise)
    for t in ref.timesteps[start:]:
        expected = ref.step(velocity(expected, t / 1000), t, expected, return_dict=False)[0]
    ours = FlowMatchScheduler("z_image")
    ours.set_timesteps(n, denoising_strength=strength)
    x = ours.add_noise(x0, noise, ours.sigmas[0])
    for i in range(ours.num_inference_steps):
        x = ours.step(velocity(x, ours.timesteps[i] / 1000), i, x)
    _assert_close(x, expected, atol=1e-5)


FLUX1_CONFIG = {
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "base_shift": 0.5,
    "max_shift": 1.15,
}


@pytest.mark.parity
@pytest.mark.parametrize("n", [1, 4, 28, 50])
@pytest.mark.parametrize("seq_len", [256, 1024, 4096, 6400])
def test_flux1_matches_diffusers(n, seq_len):
    # BFL get_schedule (linspace(1, 0, N+1) + time_shift) and diffusers (linspace(1, 1/N, N) + terminal 0) are
    # the same values; diffusers' calculate_shift is BFL's get_lin_function.
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    ref_sigmas, _ = _diffusers_sigmas(n, FLUX1_CONFIG, mu=mu)
    _assert_close(flux1(n, image_seq_len=seq_len), ref_sigmas)


@pytest.mark.parity
@pytest.mark.parametrize("n", [4, 28, 50])
@pytest.mark.parametrize("seq_len", [256, 4096, 4301, 16384])
def test_flux2_matches_diffusers(n, seq_len):
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    mu = compute_empirical_mu(seq_len, n)
    assert flux2_empirical_mu(seq_len, n) == pytest.approx(mu, abs=1e-9)
    ref_sigmas, _ = _diffusers_sigmas(n, {**FLUX1_CONFIG, "time_shift_type": "exponential"}, mu=mu)
    _assert_close(flux2(n, image_seq_len=seq_len), ref_sigmas)


QWEN_IMAGE_CONFIG = {
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}


@pytest.mark.parity
@pytest.mark.parametrize("n", [2, 8, 50])  # at N=1 diffusers' shift_terminal stretch divides 0 by 0
@pytest.mark.parametrize("seq_len", [256, 4096, 6889, 16384])
def test_qwen_image_matches_diffusers(n, seq_len):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(seq_len, 256, 8192, 0.5, 0.9)
    ref_sigmas, _ = _diffusers_sigmas(n, QWEN_IMAGE_CONFIG, mu=mu)
    ours = qwen_image(n, image_seq_len=seq_len)
    _assert_close(ours, ref_sigmas)
    assert ours[-2].item() == pytest.approx(0.02, abs=1e-7)


# lightx2v/Qwen-Image-Lightning's README: the Qwen-Image config with base_shift = max_shift = ln 3, no terminal stretch
QWEN_IMAGE_LIGHTNING_CONFIG = {
    **QWEN_IMAGE_CONFIG,
    "base_shift": math.log(3),
    "max_shift": math.log(3),
    "shift_terminal": None,
}


@pytest.mark.parity
@pytest.mark.parametrize("n", [1, 4, 8])
@pytest.mark.parametrize("seq_len", [16, 4096, 16384])
def test_qwen_image_lightning_matches_diffusers(n, seq_len):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(seq_len, 256, 8192, math.log(3), math.log(3))
    ref_sigmas, ref_timesteps = _diffusers_sigmas(n, QWEN_IMAGE_LIGHTNING_CONFIG, mu=mu)
    scheduler = FlowMatchScheduler("qwen_image_lightning")
    scheduler.set_timesteps(n, image_seq_len=seq_len)
    _assert_close(scheduler.sigmas, ref_sigmas)
    _assert_close(scheduler.timesteps, ref_timesteps, atol=1e-3)
    _assert_close(qwen_image_lightning(n), static_shift_3(n))  # mu = ln 3 is a static shift 3 at any size


def static_shift_3(n):
    grid = torch.linspace(1, 0, n + 1, dtype=torch.float64)[:n]
    return torch.cat([3 * grid / (1 + 2 * grid), torch.zeros(1, dtype=torch.float64)]).float()


def test_qwen_image_lightning_mu_override_and_no_stretch():
    assert qwen_image_lightning(4, mu=0.5).tolist() == qwen_image(4, mu=0.5, shift_terminal=None).tolist()
    assert qwen_image_lightning(4, mu=math.log(2.5))[1].item() == pytest.approx(2.5 * 0.75 / (1 + 1.5 * 0.75))
    assert qwen_image_lightning(8)[-2].item() == pytest.approx(0.3, abs=1e-7)  # 1/8 shifted by 3, not 0.02


# ------------------------------------------------------------------------------------- closed forms / tables
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 12.0])
@pytest.mark.parametrize("n", [1, 7, 50])
def test_wan_is_the_static_shift_formula(n, shift):
    t = [1 - i / n for i in range(n)]
    expected = torch.tensor([shift * x / (1 + (shift - 1) * x) for x in t] + [0.0])
    _assert_close(wan(n, shift=shift), expected)
    assert wan(n).tolist() == wan(n, shift=5.0).tolist()
    # Wan's UniPC grid starts at 1 - 1/1000
    assert wan(n, sigma_max=0.999)[0].item() == pytest.approx(5 * 0.999 / (1 + 4 * 0.999), abs=1e-7)


def _authors_ltx2(steps, tokens=4096, max_shift=2.05, base_shift=0.95, terminal=0.1):
    """Lightricks/LTX-2 LTX2Scheduler.execute, transcribed step by step (float32, as theirs)."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    mm = (max_shift - base_shift) / (4096 - 1024)
    shift = tokens * mm + (base_shift - mm * 1024)
    shifted = math.exp(shift) / (math.exp(shift) + (1 / sigmas - 1))
    sigmas = torch.where(sigmas != 0, shifted, 0)
    nonzero = sigmas != 0
    one_minus_z = 1.0 - sigmas[nonzero]
    sigmas[nonzero] = 1.0 - one_minus_z / (one_minus_z[-1] / (1.0 - terminal))
    return sigmas.float()


@pytest.mark.parametrize("n", [2, 8, 40])
@pytest.mark.parametrize("tokens", [1024, 4096, 6144])
def test_ltx2_matches_authors_formula(n, tokens):
    _assert_close(ltx2(n, image_seq_len=tokens), _authors_ltx2(n, tokens))
    assert ltx2(n)[-2].item() == pytest.approx(0.1, abs=1e-7)


def test_terminal_zero_means_no_stretch():
    """diffusers treats shift_terminal=0 as off; a stretch to 0 would end on [..., 0, 0] (a model call at sigma 0)."""
    assert qwen_image(4, shift_terminal=0.0).tolist() == qwen_image(4, shift_terminal=None).tolist()
    assert ltx2(4, terminal=0.0).tolist() == ltx2(4, stretch=False).tolist()
    for sigmas in (qwen_image(4, shift_terminal=0.0), ltx2(4, terminal=0.0)):
        assert (sigmas[1:] < sigmas[:-1]).all()


def test_ltx2_fixed_tables():
    s = FlowMatchScheduler("ltx2_distilled")
    s.set_timesteps(8)
    assert s.sigmas.tolist() == torch.tensor(LTX2_DISTILLED_SIGMAS).tolist()
    s = FlowMatchScheduler("ltx2_stage2")
    s.set_timesteps(3)
    assert s.sigmas.tolist() == torch.tensor(LTX2_STAGE2_SIGMAS).tolist()
    assert s.sigmas[0].item() == pytest.approx(0.909375)
    with pytest.raises(ConfigError, match=r"num_inference_steps=5 .*ltx2_stage2.*use 3"):
        s.set_timesteps(5)


def test_mu_helpers():
    assert linear_mu(256, 256, 4096, 0.5, 1.15) == pytest.approx(0.5)
    assert linear_mu(4096, 256, 4096, 0.5, 1.15) == pytest.approx(1.15)
    # FLUX.1-schnell: BFL turns the shift off, which is mu = 0
    _assert_close(flux1(4, mu=0.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    # flux2 above 4300 tokens ignores the step count
    assert flux2_empirical_mu(8192, 4) == flux2_empirical_mu(8192, 50)


# ------------------------------------------------------------------------------------------------ invariants
@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("n", [1, 2, 9, 30])
def test_schedule_invariants(template, n):
    n = FIXED_STEPS.get(template, n)
    s = FlowMatchScheduler(template)
    s.set_timesteps(n)
    assert s.sigmas.dtype == torch.float32 and s.sigmas.shape == (n + 1,)
    assert s.sigmas[0].item() <= 1 and s.sigmas[-1].item() == 0
    assert (s.sigmas[1:] <= s.sigmas[:-1]).all()
    assert torch.isfinite(s.sigmas).all()
    assert s.timesteps.shape == (n,) and s.num_inference_steps == n
    _assert_close(s.timesteps, s.sigmas[:-1] * 1000, atol=0)


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_euler_recovers_x0_on_a_linear_trajectory(template):
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    s = FlowMatchScheduler(template)
    s.set_timesteps(FIXED_STEPS.get(template, 6))
    x = s.add_noise(x0, noise, s.sigmas[0])
    for i in range(s.num_inference_steps):
        x = s.step(s.training_target(x0, noise), i, x)
        # every step lands on the straight line at the next sigma
        _assert_close(x, s.add_noise(x0, noise, s.sigmas[i + 1]), atol=1e-5)
    _assert_close(x, x0, atol=1e-5)


def test_step_keeps_dtype_and_uses_sigma_difference():
    s = FlowMatchScheduler("wan")
    s.set_timesteps(4)
    sample, velocity = torch.ones(1, 2, dtype=torch.bfloat16), torch.full((1, 2), 2.0, dtype=torch.bfloat16)
    out = s.step(velocity, 1, sample)
    assert out.dtype == torch.bfloat16
    expected = 1 + (s.sigmas[2] - s.sigmas[1]).item() * 2
    assert out.float()[0, 0].item() == pytest.approx(expected, abs=1e-2)


def test_add_noise_inverse_and_per_sample_sigma():
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 5, generator=gen), torch.randn(3, 4, 5, generator=gen)
    sigma = torch.tensor([0.0, 0.3, 1.0])
    xt = FlowMatchScheduler.add_noise(x0, noise, sigma)
    _assert_close(xt[0], x0[0], atol=0)
    _assert_close(xt[2], noise[2], atol=0)
    target = FlowMatchScheduler.training_target(x0, noise)
    _assert_close(xt - sigma.view(-1, 1, 1) * target, x0, atol=1e-6)  # x0 = x_t - sigma * v
    _assert_close(xt + (1 - sigma.view(-1, 1, 1)) * target, noise, atol=1e-6)  # noise = x_t + (1 - sigma) * v
    _assert_close(FlowMatchScheduler.add_noise(x0, noise, 0.3)[1], xt[1], atol=0)


# -------------------------------------------------------------------------------------------------- img2img
@pytest.mark.parametrize("template", SHIFTED)
@pytest.mark.parametrize(
    ("n", "strength", "kept"), [(10, 1.0, 10), (10, 0.5, 5), (10, 0.75, 8), (9, 0.3, 3), (4, 0.01, 1)]
)
def test_strength_keeps_the_tail(template, n, strength, kept):
    # kept = n - int(n - n * strength): diffusers' img2img `get_timesteps`
    full, part = FlowMatchScheduler(template), FlowMatchScheduler(template)
    full.set_timesteps(n)
    part.set_timesteps(n, denoising_strength=strength)
    assert part.num_inference_steps == kept
    assert part.sigmas.tolist() == full.sigmas[n - kept :].tolist()
    assert part.timesteps.tolist() == full.timesteps[n - kept :].tolist()


def test_strength_first_sigma_follows_strength():
    s = FlowMatchScheduler("wan", shift=1.0)  # unshifted: the first kept sigma is the strength itself
    s.set_timesteps(20, denoising_strength=0.6)
    assert s.sigmas[0].item() == pytest.approx(0.6)


def test_explicit_sigmas():
    s = FlowMatchScheduler("z_image")
    s.set_timesteps(9, sigmas=[1.0, 0.5, 0.25], shift=7.0)  # used as given: no shift, length decides the steps
    assert s.sigmas.tolist() == [1.0, 0.5, 0.25, 0.0]
    s.set_timesteps(9, sigmas=torch.tensor([0.9, 0.4, 0.0]))  # BFL-style list that already ends with 0
    assert s.sigmas.tolist() == pytest.approx([0.9, 0.4, 0.0])
    s.set_timesteps(9, sigmas=[1.0, 0.75, 0.5, 0.25], denoising_strength=0.5)
    assert s.sigmas.tolist() == [0.5, 0.25, 0.0]
    for bad in ([], [0.5, 0.9], [1.5, 0.5], [1.0, float("nan")]):
        with pytest.raises(ConfigError, match="sigmas="):
            s.set_timesteps(4, sigmas=bad)


def test_template_defaults_and_overrides():
    s = FlowMatchScheduler("flux1", image_seq_len=256)
    s.set_timesteps(4)
    _assert_close(s.sigmas, flux1(4, mu=0.5))
    s.set_timesteps(4, image_seq_len=4096)
    _assert_close(s.sigmas, flux1(4, mu=1.15))
    _assert_close(z_image(4, shift=3.0), z_image(4))


# ------------------------------------------------------------------------------------------------- training
def test_training_sigmas_come_from_the_1000_step_grid():
    s = FlowMatchScheduler("qwen_image", image_seq_len=4096)
    draw = s.sample_training_sigmas(64, torch.Generator().manual_seed(0))
    grid = qwen_image(1000, image_seq_len=4096)[:-1]
    assert draw.shape == (64,) and draw.dtype == torch.float32
    assert all(v in set(grid.tolist()) for v in draw.tolist())
    again = s.sample_training_sigmas(64, torch.Generator().manual_seed(0))
    assert draw.tolist() == again.tolist()


def test_training_boundaries():
    s = FlowMatchScheduler("wan")
    s.set_training_grid(shift=5.0)
    gen = torch.Generator().manual_seed(0)
    high = s.sample_training_sigmas(256, gen, max_boundary=0.25)
    low = s.sample_training_sigmas(256, gen, min_boundary=0.25)
    cut = s.train_sigmas[250].item()
    assert (high > cut).all() and (low <= cut).all()


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (1.0, 0.5), (-0.5, 1.5)])
def test_logit_normal_training_draws_follow_the_density(mean, std):
    """On an unshifted grid (sigma = t), logit-normal draws have the moments of sigmoid(N(mean, std)), computed
    here by quadrature; boundaries still hold; a higher mean draws noisier levels."""
    s = FlowMatchScheduler("wan", shift=1.0)
    s.set_training_grid()
    gen = torch.Generator().manual_seed(0)
    draw = s.sample_training_sigmas(40000, gen, distribution="logit_normal", logit_mean=mean, logit_std=std).double()
    u = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    pdf = torch.exp(-0.5 * ((u - mean) / std) ** 2)
    pdf = pdf / pdf.sum()
    t = torch.sigmoid(u)
    want_mean = float((pdf * t).sum())
    want_std = float((pdf * (t - want_mean) ** 2).sum().sqrt())
    assert abs(float(draw.mean()) - want_mean) < 0.005 and abs(float(draw.std()) - want_std) < 0.005
    assert all(v in set(s.train_sigmas.tolist()) for v in draw[:200].tolist())
    low = s.sample_training_sigmas(512, gen, min_boundary=0.5, distribution="logit_normal")
    assert (low <= s.train_sigmas[500]).all()
    with pytest.raises(ConfigError, match="timestep distribution 'beta'"):
        s.sample_training_sigmas(2, distribution="beta")


def test_training_weights_are_the_diffsynth_bell():
    s = FlowMatchScheduler("wan", shift=1.0)  # unshifted grid: t = 1000, 999, ..., 1
    s.set_training_grid()
    w = s.train_weights
    assert w.shape == (1000,)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert w.min().item() == 0.0
    assert abs(s.train_sigmas[w.argmax()].item() - 0.5) <= 1e-3
    t = s.train_sigmas.double() * 1000
    bell = torch.exp(-2 * ((t - 500) / 1000) ** 2)
    _assert_close(w, ((bell - bell.min()) * 1000 / (bell - bell.min()).sum()).float(), atol=1e-5)
    _assert_close(s.training_weight(s.train_sigmas[[0, 500, 999]]), w[[0, 500, 999]], atol=0)
    assert s.training_weight(0.5).shape == ()


def test_training_errors():
    with pytest.raises(ConfigError, match="ltx2_distilled.*'ltx2'"):
        FlowMatchScheduler("ltx2_distilled").sample_training_sigmas(2)
    s = FlowMatchScheduler("flux2")
    with pytest.raises(ConfigError, match="batch=0"):
        s.sample_training_sigmas(0)
    with pytest.raises(ConfigError, match="min_boundary=0.5, max_boundary=0.5"):
        s.sample_training_sigmas(2, min_boundary=0.5, max_boundary=0.5)


# ---------------------------------------------------------------------------------------------- bad arguments
def test_unknown_template_lists_the_templates():
    with pytest.raises(ConfigError, match=r"template='sd3'.*z_image, flux1, flux2, qwen_image, wan, ltx2"):
        FlowMatchScheduler("sd3")


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "4"])
def test_bad_num_inference_steps(steps):
    with pytest.raises(ConfigError, match="num_inference_steps="):
        FlowMatchScheduler("flux1").set_timesteps(steps)


def test_a_numpy_step_count_is_an_integer():
    """A count read from a numpy array or config file counts as the int it is (and the grids agree)."""
    ours, theirs = FlowMatchScheduler("flux1"), FlowMatchScheduler("flux1")
    ours.set_timesteps(np.int64(4))
    theirs.set_timesteps(4)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=0, atol=0)


@pytest.mark.parametrize("strength", [0, -0.1, 1.5, float("nan"), None])
def test_bad_denoising_strength(strength):
    with pytest.raises(ConfigError, match=r"denoising_strength=.*\(0, 1\]"):
        FlowMatchScheduler("z_image").set_timesteps(4, denoising_strength=strength)


def test_bad_template_settings():
    with pytest.raises(ConfigError, match="'wan' does not take mu; it accepts shift, sigma_max"):
        FlowMatchScheduler("wan", mu=1.0)
    with pytest.raises(ConfigError, match="does not take shift"):
        FlowMatchScheduler("flux1").set_timesteps(4, shift=3.0)
    with pytest.raises(ConfigError, match="shift=0"):
        FlowMatchScheduler("z_image").set_timesteps(4, shift=0)
    with pytest.raises(ConfigError, match="image_seq_len=-1"):
        FlowMatchScheduler("qwen_image").set_timesteps(4, image_seq_len=-1)
    with pytest.raises(ConfigError, match="shift_terminal=1"):
        FlowMatchScheduler("qwen_image").set_timesteps(4, shift_terminal=1)


def test_bad_step_calls():
    s = FlowMatchScheduler("z_image")
    x = torch.zeros(1)
    with pytest.raises(ConfigError, match="before set_timesteps"):
        s.step(x, 0, x)
    s.set_timesteps(3)
    with pytest.raises(ConfigError, match=r"step_index=3 .*0\.\.2"):
        s.step(x, 3, x)

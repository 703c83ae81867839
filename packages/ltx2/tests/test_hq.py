"""LTX-2's HQ pipeline (`use_hq_pipeline`, `res2s.py`): the res_2s sampler against the authors' code (ltx-core /
ltx-pipelines read from the local git mirror, skipped where it is absent), the sampler's invariants (order
conditions, second-order convergence on a problem solved exactly, determinism without noise, kept latents), and the
pipeline on the tiny LTX-2.3 base: both stages run res_2s with the distilled LoRA at their strengths, seeded runs
repeat, the first frame is kept, and what HQ cannot combine with is refused."""

from __future__ import annotations

import ast
import dataclasses
import io
import math
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import diffsynth_ltx2_test_repo as repo_module  # loaded by conftest
import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.ltx2 import res2s
from diffsynth.ltx2.pipeline import STAGE_2_LORA_NAME, LTX2Pipeline
from diffsynth.ltx2.presets import PRESETS
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.lora import list_loras
from diffsynth.runtime.schedulers import FlowMatchScheduler

CAPTIONS = repo_module.CAPTIONS
H, W, F = 128, 128, repo_module.FRAMES  # the final size: the first stage samples 64 x 64 (2 x 2 latents)
SETTINGS = dict(height=H, width=W, num_frames=F, max_sequence_length=repo_module.MAX_SEQUENCE_LENGTH)
SETTINGS.update(progress_bar=False, num_inference_steps=2)
F64 = torch.float64


# ------------------------------------------------------------------------------------------------ the authors' code
MIRROR = Path("/work/.mirror/Lightricks+LTX-2/repo")
SOURCES = ("packages/ltx-core/src", "packages/ltx-pipelines/src")


def _helpers_stub(source: str) -> types.ModuleType:
    """`ltx_pipelines.utils.helpers` reduced to the two functions the sampler uses, taken from the authors' file
    (the whole module needs torchaudio and the model stack)."""
    module = types.ModuleType("ltx_pipelines.utils.helpers")
    module.torch = torch
    wanted = {"post_process_latent", "timesteps_from_mask"}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name in wanted:
            exec(compile(ast.Module([node], []), "helpers.py", "exec"), module.__dict__)  # noqa: S102
    return module


@pytest.fixture(scope="module")
def authors(tmp_path_factory):
    """The authors' res_2s pieces: `res2s` (coefficients), `steps` (ltx-core `diffusion_steps`), `schedulers`,
    `samplers` (ltx-pipelines, its heavy imports stubbed) and `LatentState`. The mirror's two source trees go on
    `sys.path` for this module's tests only."""
    if not (MIRROR / "HEAD").exists():
        pytest.skip("the Lightricks/LTX-2 git mirror is not on this machine")
    archive = subprocess.run(["git", "-C", str(MIRROR), "archive", "HEAD", *SOURCES], capture_output=True)
    if archive.returncode:
        pytest.skip(f"the LTX-2 mirror has no {SOURCES}: {archive.stderr.decode()[:200]}")
    root = tmp_path_factory.mktemp("ltx-2-authors")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(root, filter="data")
    utils = root / SOURCES[1] / "ltx_pipelines/utils"
    saved = dict(sys.modules)
    try:
        with pytest.MonkeyPatch.context() as mp:  # sys.path and sys.modules as they were once imported
            for src in SOURCES:
                mp.syspath_prepend(str(root / src))
            try:
                import scipy  # noqa: F401  (ltx-core's schedulers module imports it; LTX2Scheduler does not use it)
            except ImportError:
                mp.setitem(sys.modules, "scipy", types.ModuleType("scipy"))
            packages = {"ltx_pipelines": root / SOURCES[1] / "ltx_pipelines", "ltx_pipelines.utils": utils}
            for name, path in packages.items():  # their `__init__`s import every pipeline: bypassed
                package = types.ModuleType(name)
                package.__path__ = [str(path)]
                mp.setitem(sys.modules, name, package)
            mp.setitem(sys.modules, "ltx_pipelines.utils.helpers", _helpers_stub((utils / "helpers.py").read_text()))
            transformer = types.ModuleType("ltx_core.model.transformer")  # only annotations read it
            transformer.X0Model = object
            mp.setitem(sys.modules, "ltx_core.model.transformer", transformer)
            from ltx_core.types import LatentState

            typing = types.ModuleType("ltx_pipelines.utils.types")
            typing.LatentState, typing.Denoiser, typing.DenoisedLatentResult = LatentState, object, object
            mp.setitem(sys.modules, "ltx_pipelines.utils.types", typing)
            import ltx_core.components.diffusion_steps as steps
            import ltx_core.components.schedulers as schedulers
            import ltx_pipelines.utils.res2s as their_res2s
            import ltx_pipelines.utils.samplers as samplers
    except ImportError as error:
        pytest.skip(f"the authors' sampler does not import here: {error}")
    finally:
        for name in [m for m in sys.modules if m not in saved]:
            del sys.modules[name]
    return types.SimpleNamespace(
        res2s=their_res2s, steps=steps, schedulers=schedulers, samplers=samplers, LatentState=LatentState
    )


@pytest.mark.parity
def test_coefficients_equal_the_authors(authors):
    """Over the step sizes schedules give (h from 1e-3: below it their phi_2 loses its digits to cancellation, as
    ours, summing the series there, does not)."""
    worst = 0.0
    for h in (1e-3, 0.01, 0.05, 0.2, 0.49, 0.7, 1.5, 3.0, 4.5, 8.0):
        ours, theirs = res2s.res2s_coefficients(h), authors.res2s.get_res2s_coefficients(h, {}, 0.5)
        worst = max(worst, *(abs(a - b) for a, b in zip(ours, theirs, strict=True)))
        for k in (1, 2):
            worst = max(worst, abs(res2s.phi(k, -h) - authors.res2s.phi(k, -h)))
    print(f"res_2s coefficients and phi functions: max abs difference {worst:.3g}")
    assert worst < 1e-9


@pytest.mark.parity
def test_sde_step_and_noise_equal_the_authors(authors):
    g = torch.Generator().manual_seed(0)
    x, target, noise = (torch.randn(2, 6, 5, generator=g, dtype=F64) for _ in range(3))
    worst = 0.0
    for sigma, sigma_next in ((1.0, 0.98), (0.9, 0.5), (0.3, 0.0011), (0.0011 * 2, 0.0011)):
        for eta in (0.0, 0.5, 1.0):
            schedule = torch.tensor([sigma, sigma_next], dtype=F64)
            theirs = authors.steps.Res2sDiffusionStep().step(x, target, schedule, 0, noise=noise, eta=eta)
            ours = res2s.sde_step(x, target, sigma, sigma_next, noise, eta)
            worst = max(worst, (ours - theirs).abs().max().item())
    drawn = authors.samplers._get_new_noise(x, torch.Generator().manual_seed(5))
    ours = res2s.standardized(torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=F64))
    noise_diff = (ours - drawn).abs().max().item()
    print(f"SDE step: max abs difference {worst:.3g}; standardised noise {noise_diff:.3g}")
    assert worst < 1e-12 and noise_diff < 1e-12


@pytest.mark.parity
@pytest.mark.parametrize(
    ("frames", "height", "width", "steps"), [(121, 544, 960, 15), (9, 64, 64, 2), (33, 256, 384, 8)]
)
def test_hq_schedule_equals_the_authors(authors, tiny_ltx23_pipe, frames, height, width, steps):
    """`LTX2Scheduler.execute(latent=...)` (the HQ pipeline passes the stage-1 latent) against our `ltx2` template
    shifted by `hq_image_seq_len` (the default HQ size first: 16 x 17 x 30 latents)."""
    latent = torch.empty(1, 128, (frames - 1) // 8 + 1, height // 32, width // 32)
    theirs = authors.schedulers.LTX2Scheduler().execute(steps=steps, latent=latent)
    scheduler = FlowMatchScheduler("ltx2")
    scheduler.set_timesteps(steps, image_seq_len=res2s.hq_image_seq_len(tiny_ltx23_pipe, frames, height, width))
    diff = (scheduler.sigmas - theirs).abs().max().item()
    print(f"HQ schedule {frames}x{height}x{width}, {steps} steps: max abs difference {diff:.3g}")
    assert diff < 1e-6


def _fake_denoiser(seed: int):
    """A fixed nonlinear clean estimate of token-layout latents `[B, T, C]` at noise level sigma."""
    g = torch.Generator().manual_seed(seed)
    weights = {c: torch.randn(c, c, generator=g, dtype=F64) / math.sqrt(c) for c in (6, 4)}

    def estimate(x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = float(sigma)
        mixed = torch.tanh(x.double() @ weights[x.shape[-1]])
        return ((1.0 - sigma) * mixed + 0.3 * sigma * x.double()).to(x.dtype)

    return estimate


class _Draws:
    """The same standardised noise for both loops: the k-th request gets the k-th draw. With `only_seed`, requests
    from a generator of another seed get zeros and are not counted (the authors draw the end-of-step noise at eta 0
    and discard it; we do not draw it)."""

    def __init__(self, only_seed: int | None = None):
        self.count, self.only_seed = 0, only_seed

    def __call__(self, x, generator=None):
        if generator is not None and self.only_seed is not None and generator.initial_seed() != self.only_seed:
            return torch.zeros(x.shape, dtype=F64)
        self.count += 1
        raw = torch.randn(x.shape, generator=torch.Generator().manual_seed(1000 + self.count), dtype=F64)
        return res2s.standardized(raw)


@pytest.mark.parity
@pytest.mark.parametrize("eta", [0.5, 0.0])
def test_whole_loop_equals_the_authors(authors, eta):
    """The authors' `res2s_audio_video_denoising_loop` (defaults but fp32 state and our noise) against `res2s_loop`,
    on a fake denoiser, a video stream with a kept and a half-kept token and an audio stream: an 8-step LTX-2
    schedule to 0, so the re-anchoring, the stop at 0.0011 and the last clean estimate all run."""
    g = torch.Generator().manual_seed(3)
    video, audio = torch.randn(1, 8, 6, generator=g), torch.randn(1, 5, 4, generator=g)
    mask = torch.ones(1, 8, 1)
    mask[0, 0], mask[0, 1] = 0.0, 0.5
    clean = torch.randn(1, 8, 6, generator=g)
    video[:, :1] = clean[:, :1]
    estimate = _fake_denoiser(4)
    sigmas = FlowMatchScheduler("ltx2")
    sigmas.set_timesteps(8, image_seq_len=2048)
    sigmas = sigmas.sigmas

    def state(latent, denoise_mask, clean_latent):
        fields = {f.name: None for f in dataclasses.fields(authors.LatentState)} | {"frozen": False}
        return authors.LatentState(**{**fields, "latent": latent, "denoise_mask": denoise_mask,
                                      "clean_latent": clean_latent})  # fmt: skip

    def their_denoiser(transformer, video_state, audio_state, sigmas, step_index):
        sigma = sigmas[step_index]
        result = types.SimpleNamespace
        return result(denoised=estimate(video_state.latent, sigma)), result(
            denoised=estimate(audio_state.latent, sigma)
        )

    theirs_v, theirs_a = authors.samplers.res2s_audio_video_denoising_loop(
        sigmas=sigmas.clone(), video_state=state(video.clone(), mask, clean), audio_state=state(
            audio.clone(), torch.ones(1, 5, 1), torch.zeros_like(audio)
        ), stepper=authors.steps.Res2sDiffusionStep(), transformer=None, denoiser=their_denoiser, eta=eta,
        new_noise_fn=_Draws(only_seed=9999 if eta == 0.0 else None), model_dtype=torch.float32,
    )  # fmt: skip
    kept = (res2s.Kept(mask, clean), res2s.Kept(torch.ones(1, 5, 1), torch.zeros_like(audio)))
    draws = _Draws()
    ours = res2s.res2s_loop(
        lambda v, a, sigma: (estimate(v, sigma), estimate(a, sigma)), video, audio, sigmas, draws, kept=kept, eta=eta
    )
    assert draws.count == (2 if eta == 0.0 else 4) * 8  # their middle-point generator is seeded 9999
    diffs = [(o - t.latent).abs().max().item() for o, t in zip(ours, (theirs_v, theirs_a), strict=True)]
    print(f"res_2s loop (eta {eta}): video max abs difference {diffs[0]:.3g}, audio {diffs[1]:.3g}")
    assert max(diffs) < 1e-5 and ours[0].abs().max() > 0.1
    assert torch.equal(ours[0][:, 0], clean[:, 0])


# ------------------------------------------------------------------------------------------------ the sampler alone
def _phi_by_quadrature(k: int, z: float) -> float:
    """phi_k(z) = integral over [0, 1] of e^{(1 - t) z} t^{k-1} / (k-1)! dt (Gauss-Legendre, 40 nodes)."""
    nodes, weights = np.polynomial.legendre.leggauss(40)
    t = (nodes + 1) / 2
    return float(np.sum(weights / 2 * np.exp((1 - t) * z) * t ** (k - 1)) / math.factorial(k - 1))


@pytest.mark.parametrize("h", [1e-6, 1e-3, 0.05, 0.3, 1.0, 2.5, 6.0])
def test_coefficients_meet_the_second_order_conditions(h):
    """A two-stage exponential Runge-Kutta method has stiff order 2 when its weights sum to phi_1(-h), the second
    one times c2 is phi_2(-h), and the stage weight is c2 phi_1(-c2 h) (Hochbruck & Ostermann)."""
    a21, b1, b2 = res2s.res2s_coefficients(h)
    c2 = res2s.C2
    assert b1 + b2 == pytest.approx(_phi_by_quadrature(1, -h), rel=1e-12, abs=1e-15)
    assert c2 * b2 == pytest.approx(_phi_by_quadrature(2, -h), rel=1e-12, abs=1e-15)
    assert a21 == pytest.approx(c2 * _phi_by_quadrature(1, -c2 * h), rel=1e-12, abs=1e-15)
    assert h * a21 == pytest.approx(1 - math.sqrt(math.exp(-h)), rel=1e-12)  # the middle point sits at sqrt(s s')


def test_noise_injection_keeps_the_marginal():
    """Scaled signal share `1 - sigma_next`, noise variance `sigma_next^2`: the re-noised point is where the
    schedule says, whatever eta."""
    for sigma_next in (0.9, 0.4, 0.0011):
        for eta in (0.1, 0.5, 1.0):
            scale, down, up = res2s.sde_coefficients(sigma_next, eta)
            assert scale * (1 - down) == pytest.approx(1 - sigma_next, rel=1e-12)
            assert (scale * down) ** 2 + up**2 == pytest.approx(sigma_next**2, rel=1e-9)


MU, SPREAD = 0.7, 0.5  # 1-D Gaussian data: the clean estimate and the flow's solution are known in closed form


def _gaussian_estimate(x, sigma):
    a = 1 - sigma
    return MU + a * SPREAD**2 / (a * a * SPREAD**2 + sigma**2) * (x - a * MU)


def _gaussian_flow(x, sigma, sigma_next):
    """The flow keeps `(x - mean) / std` of the noised data: the exact solution from `sigma` to `sigma_next`."""
    std = [math.sqrt((1 - s) ** 2 * SPREAD**2 + s**2) for s in (sigma, sigma_next)]
    return (1 - sigma_next) * MU + std[1] / std[0] * (x - (1 - sigma) * MU)


def test_res2s_converges_at_second_order_and_euler_at_first():
    """From sigma 1 to 0.05 on log-uniform grids: halving the step divides res_2s's error by ~4, Euler's by ~2."""
    x = torch.linspace(-2, 2, 9, dtype=F64)
    errors = {"res2s": [], "euler": []}
    for n in (8, 16, 32):
        sigmas = torch.logspace(0, math.log10(0.05), n + 1, dtype=torch.float32).tolist()
        exact = _gaussian_flow(x, sigmas[0], sigmas[-1])
        got, _ = res2s.res2s_loop(
            lambda v, a, s: (_gaussian_estimate(v, s), _gaussian_estimate(a, s)), x, x, sigmas, eta=0.0, substep_eta=0.0
        )
        errors["res2s"].append((got - exact).abs().max().item())
        euler = x.clone()
        for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            euler = euler + (s_next - s) * (euler - _gaussian_estimate(euler, s)) / s
        errors["euler"].append((euler - exact).abs().max().item())
    for name, expected in (("res2s", 4.0), ("euler", 2.0)):
        ratios = [a / b for a, b in zip(errors[name][:-1], errors[name][1:], strict=True)]
        print(name, errors[name], ratios)
        assert all(abs(r - expected) < 0.25 * expected for r in ratios), (name, ratios)
    assert errors["res2s"][-1] < errors["euler"][-1] / 50


def test_without_noise_the_loop_draws_none_and_repeats():
    def refuse(x):
        raise AssertionError("no noise is drawn with eta 0")

    estimate = _fake_denoiser(1)
    g = torch.Generator().manual_seed(0)
    video, audio = torch.randn(1, 8, 6, generator=g), torch.randn(1, 5, 4, generator=g)
    run = [
        res2s.res2s_loop(
            lambda v, a, s: (estimate(v, s), estimate(a, s)),
            video,
            audio,
            [1.0, 0.6, 0.2, 0.0],
            refuse,
            eta=0.0,
            substep_eta=0.0,
        )  # fmt: skip
        for _ in range(2)
    ]
    assert torch.equal(run[0][0], run[1][0]) and torch.equal(run[0][1], run[1][1])
    draws = _Draws()
    noisy = res2s.res2s_loop(
        lambda v, a, s: (estimate(v, s), estimate(a, s)), video, audio, [1.0, 0.6, 0.2, 0.0], draws
    )
    assert draws.count == 3 * 4  # per step: the middle point and the end, video and audio
    assert (noisy[0] - run[0][0]).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="needs a noise source"):
        res2s.res2s_loop(lambda v, a, s: (v, a), video, audio, [1.0, 0.0])


def test_a_constant_estimate_is_followed_exactly():
    """With a clean estimate that does not change, the exponential step is exact: `x0 + sigma' / sigma (x - x0)`."""
    x0 = torch.tensor([0.3, -1.2], dtype=F64)
    x = torch.tensor([1.5, 0.4], dtype=F64)
    sigmas = torch.tensor([1.0, 0.5, 0.2], dtype=torch.float32).tolist()
    got, _ = res2s.res2s_loop(lambda v, a, s: (x0, x0), x, x, sigmas, eta=0.0, substep_eta=0.0)
    torch.testing.assert_close(got, x0 + sigmas[-1] / sigmas[0] * (x - x0), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------ the pipeline
@pytest.fixture(scope="module")
def hq_pipe(tiny_ltx23_base, tiny_ltx23_pipe):
    upsampler, lora = repo_module.write_two_stage_files(tiny_ltx23_base / "hq", tiny_ltx23_pipe.dit, version="2.3")
    return repo_module.our_pipeline(
        tiny_ltx23_base, version="2.3", model_configs=[ModelConfig(path=str(upsampler))], stage2_lora_config=str(lora)
    )


def test_both_stages_run_res2s_with_the_lora_at_their_strengths(hq_pipe, monkeypatch):
    """Stage 1 at half size: the schedule shifted by its 2 x 2 x 2 latents, two guided calls a step (CFG and
    modality isolation in one batch, STG off), the distilled LoRA at 0.25; stage 2 at full size from 0.909375,
    unguided, at 0.5; each stage ends with a clean estimate at 0.0011. The sound is the first stage's."""
    seen, outputs = [], []
    real_predict, real_denoise = LTX2Pipeline.predict, res2s.denoise

    def spy(self, video, audio, sigma, text, *args, **kwargs):
        scales = list_loras(self.dit)
        seen.append(
            (tuple(video.shape[-2:]), round(float(sigma), 6), scales.get(STAGE_2_LORA_NAME), text.video.shape[0])
        )
        return real_predict(self, video, audio, sigma, text, *args, **kwargs)

    def spy_denoise(*args, **kwargs):
        outputs.append(real_denoise(*args, **kwargs))
        return outputs[-1]

    kept = []
    real_finish = LTX2Pipeline.finish
    monkeypatch.setattr(LTX2Pipeline, "predict", spy)
    monkeypatch.setattr(res2s, "denoise", spy_denoise)
    monkeypatch.setattr(
        LTX2Pipeline, "finish", lambda self, v, a, *r, **k: kept.append(a) or real_finish(self, v, a, *r, **k)
    )
    hq_pipe(CAPTIONS[0], seed=0, use_hq_pipeline=True, **SETTINGS)
    assert [s[0] for s in seen] == [(2, 2)] * 5 + [(4, 4)] * 7
    schedule = FlowMatchScheduler("ltx2")
    schedule.set_timesteps(2, image_seq_len=2 * 2 * 2)
    first = [float(s) for s in schedule.sigmas[:2]] + [0.0011]
    mids = [math.sqrt(a * b) for a, b in zip(first[:-1], first[1:], strict=True)]
    expected = [first[0], mids[0], first[1], mids[1], 0.0011]
    stage_2 = [0.909375, 0.725, 0.421875, 0.0011]
    expected += [v for a, b in zip(stage_2[:-1], stage_2[1:], strict=True) for v in (a, math.sqrt(a * b))] + [0.0011]
    assert [s[1] for s in seen] == pytest.approx(expected, abs=1e-6)
    assert [s[2] for s in seen] == [0.25] * 5 + [0.5] * 7
    assert [s[3] for s in seen] == [2] * 5 + [1] * 7  # prompts and negative prompts (CFG), then unguided
    assert list_loras(hq_pipe.dit) == {}
    assert len(outputs) == 2 and torch.equal(kept[0], outputs[0][1])  # the first stage's sound is decoded


def test_seeded_calls_repeat_and_the_seed_and_strengths_matter(hq_pipe):
    """The same seed gives the same clip and sound (the SDE noise comes from the call's generator); another seed, or
    the stage-1 LoRA off, another."""
    kwargs = dict(output_type="pt", use_hq_pipeline=True, **{**SETTINGS, "num_inference_steps": 1})
    first = hq_pipe(CAPTIONS[1], seed=5, **kwargs)
    again = hq_pipe(CAPTIONS[1], seed=5, **kwargs)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1].waveform, again[1].waveform)
    other = hq_pipe(CAPTIONS[1], seed=6, **kwargs)
    assert (other[0] - first[0]).abs().max() > 1e-3
    weaker = hq_pipe(CAPTIONS[1], seed=5, stage1_lora_strength=0.0, **kwargs)
    assert (weaker[0] - first[0]).abs().max() > 1e-3 and (weaker[1].waveform - first[1].waveform).abs().max() > 0


def test_image_to_video_keeps_the_first_frame_exactly(hq_pipe, monkeypatch):
    """The first latent frame at the end of stage 2 is the image's latent, bit for bit (every estimate and every
    re-noised point is pulled back to it)."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize((W, H), Image.BILINEAR)
    cleans, finals = [], []
    real_condition, real_finish = LTX2Pipeline.first_frame_condition, LTX2Pipeline.finish

    def condition(self, *args, **kwargs):
        out = real_condition(self, *args, **kwargs)
        cleans.append(out[2])
        return out

    monkeypatch.setattr(LTX2Pipeline, "first_frame_condition", condition)
    monkeypatch.setattr(
        LTX2Pipeline, "finish", lambda self, v, *r, **k: finals.append(v) or real_finish(self, v, *r, **k)
    )
    hq_pipe(CAPTIONS[2], seed=1, input_image=image, use_hq_pipeline=True, **SETTINGS)
    assert finals[0].shape[-2:] == cleans[-1].shape[-2:] == (4, 4)
    assert torch.equal(finals[0][:, :, 0], cleans[-1][:, :, 0])
    assert (finals[0][:, :, 1:] - cleans[-1][:, :, 1:]).abs().max() > 1e-2


def test_audio_guidance_rescale_acts_on_the_audio_only(hq_pipe):
    g = torch.Generator().manual_seed(0)
    video = torch.randn(1, hq_pipe.dit.config.in_channels, 2, 2, 2, generator=g)
    audio = torch.randn(hq_pipe.audio_latent_shape(1, F, 24.0), generator=g)
    text = hq_pipe.encode_prompt([CAPTIONS[0], CAPTIONS[3]], repo_module.MAX_SEQUENCE_LENGTH)
    call = (video, audio, 0.6, text, 24.0, True, 3.0, 7.0)
    both = hq_pipe.predict(*call, (0.0, 1.0))
    plain, rescaled = hq_pipe.predict(*call, 0.0), hq_pipe.predict(*call, 1.0)
    assert torch.equal(both[0], plain[0]) and torch.equal(both[1], rescaled[1])
    assert (plain[1] - rescaled[1]).abs().max() > 1e-4


def test_hq_refuses_what_it_cannot_combine_with(hq_pipe, tiny_ltx23_pipe):
    for extra, words in (
        ({"use_distilled_pipeline": True}, "use_distilled_pipeline"),
        ({"use_dfr_pipeline": True}, "use_dfr_pipeline"),
        ({"use_two_stage_pipeline": False}, "use_two_stage_pipeline=False"),
    ):
        with pytest.raises(ConfigError, match=f"use_hq_pipeline does not take {words}"):
            hq_pipe(CAPTIONS[0], use_hq_pipeline=True, **SETTINGS, **extra)
    with pytest.raises(ConfigError, match="stage1_lora_strength belongs to the HQ pipeline"):
        hq_pipe(CAPTIONS[0], stage1_lora_strength=0.5, **SETTINGS)
    with pytest.raises(ConfigError, match="audio_guidance_rescale=2.0"):
        hq_pipe(CAPTIONS[0], use_hq_pipeline=True, audio_guidance_rescale=2.0, **SETTINGS)
    with pytest.raises(ConfigError, match="latent upsampler"):
        tiny_ltx23_pipe(CAPTIONS[0], use_hq_pipeline=True, **SETTINGS)
    with pytest.raises(ConfigError, match="multiples of 64"):
        hq_pipe(CAPTIONS[0], use_hq_pipeline=True, **{**SETTINGS, "height": 96})
    lora = hq_pipe.stage2_lora
    try:
        hq_pipe.stage2_lora = None
        with pytest.raises(ConfigError, match="stage2_lora_config"):
            hq_pipe(CAPTIONS[0], use_hq_pipeline=True, **SETTINGS)
    finally:
        hq_pipe.stage2_lora = lora


def test_presets_are_the_two_stage_files_with_the_authors_hq_settings():
    for repo in ("Lightricks/LTX-2.3", "Lightricks/LTX-2.5"):
        hq, two = PRESETS[f"{repo}:hq"], PRESETS[f"{repo}:two-stage"]
        assert hq.files == two.files and hq.tokenizer == two.tokenizer
        assert hq.defaults["stage2_lora"] == two.defaults["stage2_lora"]
        assert "use_two_stage_pipeline" not in hq.defaults  # implied by use_hq_pipeline
        expected = {"use_hq_pipeline": True, "num_inference_steps": 15, "height": 1088, "width": 1920}
        expected.update(stg_scale=0.0, audio_stg_scale=0.0, guidance_rescale=0.45, audio_guidance_rescale=1.0)
        expected.update(cfg_scale=3.0, audio_cfg_scale=7.0, modality_scale=3.0, stage1_lora_strength=0.25)
        expected.update(stage2_lora_strength=0.5)
        assert {k: hq.defaults[k] for k in expected} == expected
    assert "num_frames" not in PRESETS["Lightricks/LTX-2.5:hq"].defaults  # the duration head picks the length

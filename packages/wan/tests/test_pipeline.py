"""WanVideoPipeline on tiny random repos: seeding, latents=, frame rounding, outputs, bad input, video-to-video,
the A14B expert hand-over, the first-block cache, I2V / FLF2V / TI2V conditioning, folder loading, the CLI,
presets; and parity with diffusers' WanPipeline / WanImageToVideoPipeline (and its first-block cache) on the same
repos, noise and schedule."""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import pil_to_tensor
from diffsynth.runtime.schedulers import FlowMatchScheduler
from diffsynth.wan import WanVideoPipeline

PROMPT = "a red circle on a blue background"
FAST = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2, "cfg_scale": 1.0, "progress_bar": False}
NOISE_SHAPE = (1, 16, 2, 4, 4)  # z 16, 1 + (5 - 1) / 4 latent frames, 32 / 8


def load(repo) -> WanVideoPipeline:
    return WanVideoPipeline.from_pretrained(str(repo), torch_dtype="float32", device="cpu")


def image(seed: int, size=(32, 32)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


class Calls:
    """Records every DiT call (inputs as passed to forward) through a forward pre-hook."""

    def __init__(self, *modules):
        self.calls: list[tuple[torch.nn.Module, tuple, dict]] = []
        self.hooks = [m.register_forward_pre_hook(self._record, with_kwargs=True) for m in modules]

    def _record(self, module, args, kwargs):
        self.calls.append((module, tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args), dict(kwargs)))

    def __enter__(self):
        return self.calls

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()


@pytest.fixture(scope="module")
def pipe(tiny_repo):
    return load(tiny_repo)


@pytest.fixture(scope="module")
def reference(pipe):
    """One video every test can compare with: seed 7, no guidance, as "pt"."""
    return pipe(PROMPT, seed=7, output_type="pt", **FAST)


# ----------------------------------------------------------------------------------------- text-to-video
def test_loads_every_model_from_the_hub_layout(pipe):
    assert type(pipe.dit).__name__ == "WanDiT" and pipe.dit2 is None and pipe.image_encoder is None
    assert type(pipe.text_encoder).__name__ == "WanTextEncoder" and type(pipe.vae).__name__ == "WanVAE"
    assert pipe.tokenizer is not None


def test_seeding_and_output_types(pipe, reference):
    arr = pipe(PROMPT, seed=7, output_type="np", **FAST)
    frames = pipe(PROMPT, seed=7, **FAST)
    other = pipe(PROMPT, seed=8, output_type="np", **FAST)
    assert reference.shape == (1, 3, 5, 32, 32) and arr.shape == (1, 5, 32, 32, 3)
    assert np.array_equal(reference.permute(0, 2, 3, 4, 1).numpy(), arr)  # same seed, same video
    assert 0.0 <= arr.min() and arr.max() <= 1.0 and np.abs(arr - other).max() > 1e-3
    assert isinstance(frames, list) and len(frames) == 5 and frames[0].size == (32, 32)
    assert np.abs(np.asarray(frames[2], dtype=np.float32) / 255 - arr[0, 2]).max() <= 1 / 255 + 1e-6


def test_latents_argument_equals_seeded_noise(pipe, reference):
    noise = torch.randn(NOISE_SHAPE, generator=torch.Generator("cpu").manual_seed(7))
    torch.testing.assert_close(pipe(PROMPT, latents=noise, output_type="pt", **FAST), reference, rtol=0, atol=0)


def test_batch_of_prompts_equals_one_by_one(pipe, reference):
    other = "a yellow triangle on a black background"
    noise = torch.randn(NOISE_SHAPE, generator=torch.Generator("cpu").manual_seed(7))
    batch = pipe([PROMPT, other], latents=torch.cat([noise, noise.flip(-1)]), output_type="pt", **FAST)
    single = pipe(other, latents=noise.flip(-1), output_type="pt", **FAST)
    torch.testing.assert_close(batch[:1], reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch[1:], single, atol=1e-5, rtol=1e-5)


def test_cfg_one_ignores_the_negative_prompt_and_cfg_merge_equals_two_passes(pipe, reference):
    same = pipe(PROMPT, negative_prompt="bad quality", seed=7, output_type="pt", **FAST)
    guided = pipe(PROMPT, negative_prompt="bad quality", seed=7, output_type="pt", **dict(FAST, cfg_scale=4.0))
    merged = pipe(
        PROMPT, negative_prompt="bad quality", seed=7, output_type="pt", cfg_merge=True, **dict(FAST, cfg_scale=4.0)
    )
    torch.testing.assert_close(same, reference, rtol=0, atol=0)
    assert (reference - guided).abs().max() > 1e-3
    torch.testing.assert_close(merged, guided, atol=1e-5, rtol=1e-5)


def test_frames_and_size_are_rounded_with_warnings(pipe, reference, caplog):
    got = pipe(PROMPT, seed=7, output_type="pt", **dict(FAST, num_frames=6, height=40))
    assert "num_frames=6 rounded to 5" in caplog.text and "rounded to 32x32" in caplog.text
    torch.testing.assert_close(got, reference, rtol=0, atol=0)
    assert pipe.check_num_frames(8) == 9 and pipe.check_num_frames(81) == 81 and pipe.check_num_frames(2) == 1


def test_video_to_video_starts_from_the_noised_input(pipe, reference):
    """Strength 0.5 of 4 steps: 2 DiT calls, the first on (1 - s) * encode(video) + s * noise."""
    video = [Image.fromarray(f) for f in (reference[0].permute(1, 2, 3, 0).numpy() * 255).round().astype(np.uint8)]
    with Calls(pipe.dit) as calls:
        pipe(PROMPT, input_video=video, denoising_strength=0.5, seed=5, **dict(FAST, num_inference_steps=4))
    scheduler = FlowMatchScheduler("wan")
    scheduler.set_timesteps(4, denoising_strength=0.5, shift=5.0)
    clean = pipe.vae.encode(pil_to_tensor(video).transpose(0, 1)[None], tiled=True)
    noise = torch.randn(NOISE_SHAPE, generator=torch.Generator("cpu").manual_seed(5))
    assert len(calls) == 2 == len(scheduler.timesteps)
    torch.testing.assert_close(
        calls[0][1][0], scheduler.add_noise(clean, noise, scheduler.sigmas[0]), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(calls[0][1][1], scheduler.timesteps[:1])


@pytest.mark.parity
@pytest.mark.parametrize(("steps", "strength"), [(4, 0.3), (10, 0.25), (20, 0.33), (4, 0.5), (3, 1.0)])
def test_video_to_video_runs_as_many_steps_as_diffusers(pipe, reference, steps, strength):
    """diffusers' `WanVideoToVideoPipeline.get_timesteps` keeps the last int(N * strength) steps (the Flux / SD3
    image-to-image rule, int(N - N * strength) skipped, runs one more when N * strength is not whole); the DiT sees
    the tail of our full schedule."""
    from types import SimpleNamespace

    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0)
    theirs.set_timesteps(steps)
    wan_v2v = SimpleNamespace(scheduler=theirs)  # get_timesteps reads only self.scheduler
    _, kept = diffusers.WanVideoToVideoPipeline.get_timesteps(wan_v2v, steps, theirs.timesteps, strength, "cpu")
    video = [Image.fromarray(f) for f in (reference[0].permute(1, 2, 3, 0).numpy() * 255).round().astype(np.uint8)]
    with Calls(pipe.dit) as calls:
        pipe(PROMPT, input_video=video, denoising_strength=strength, seed=5, **dict(FAST, num_inference_steps=steps))
    full = FlowMatchScheduler("wan")
    full.set_timesteps(steps, shift=5.0)
    assert len(calls) == kept
    torch.testing.assert_close(torch.cat([call[1][1] for call in calls]), full.timesteps[steps - kept :])


def _unipc_run(pipe, steps: int):
    """The DiT's inputs and outputs over a `sampler="unipc"` call (no guidance: the output is the velocity)."""
    seen = []
    hook = pipe.dit.register_forward_hook(lambda m, args, out: seen.append((args[0].clone(), args[1].clone(), out)))
    try:
        pipe(PROMPT, seed=7, sampler="unipc", **dict(FAST, num_inference_steps=steps))
    finally:
        hook.remove()
    return seen


def test_unipc_sampler_steps_with_unipc_on_the_authors_grid(pipe, reference):
    """`sampler="unipc"`: the DiT sees the noise, then each sample UniPC makes from the velocities so far, at the
    timesteps of the authors' UniPC grid (from 1 - 1/1000, shifted); the video differs from Euler's."""
    from diffsynth.runtime.schedulers import UniPCScheduler

    seen = _unipc_run(pipe, 4)
    scheduler = UniPCScheduler("wan")
    scheduler.set_timesteps(4, shift=5.0, sigma_max=0.999)
    torch.testing.assert_close(torch.stack([t for _, t, _ in seen]).flatten(), scheduler.timesteps)
    noise = torch.randn(NOISE_SHAPE, generator=torch.Generator("cpu").manual_seed(7))
    torch.testing.assert_close(seen[0][0], noise, rtol=0, atol=0)
    for i in range(3):
        torch.testing.assert_close(seen[i + 1][0], scheduler.step(seen[i][2], i, seen[i][0]), rtol=1e-6, atol=1e-6)
    unipc = pipe(PROMPT, seed=7, sampler="unipc", output_type="pt", **FAST)
    assert (unipc - reference).abs().max() > 1e-4
    with pytest.raises(ConfigError, match="sampler='dpm' is not known"):
        pipe(PROMPT, seed=7, sampler="dpm", **FAST)


@pytest.mark.parity
def test_unipc_grid_and_steps_match_diffusers_wan_scheduler(pipe):
    """diffusers' Wan pipelines sample with `UniPCMultistepScheduler(prediction_type="flow_prediction",
    use_flow_sigmas=True, flow_shift=...)`. Given the authors' unshifted grid (linspace from 1 - 1/1000 to 0; its own
    default grid runs from 1 to 1/1000 instead) it shifts it to our sigmas and, fed the same velocities, makes
    the same samples."""
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    theirs.set_timesteps(sigmas=np.linspace(0.999, 0.0, 5)[:-1])
    seen = _unipc_run(pipe, 4)
    torch.testing.assert_close(
        torch.stack([t for _, t, _ in seen]).flatten(), 1000 * theirs.sigmas[:-1]
    )  # (theirs: int)
    for i in range(3):
        step = theirs.step(seen[i][2], theirs.timesteps[i], seen[i][0]).prev_sample
        torch.testing.assert_close(seen[i + 1][0], step, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"prompt": ""}, "prompt is empty"),
        ({"height": 0}, "height=0"),
        ({"num_frames": 0}, "num_frames=0"),
        ({"output_type": "gif"}, "output_type='gif'"),
        ({"latents": torch.zeros(1, 16, 1, 8, 8)}, "latents must be"),
        ({"prompt": [PROMPT, PROMPT], "negative_prompt": ["a", "b", "c"]}, "negative_prompt has 3"),
        ({"input_image": Image.new("RGB", (32, 32))}, "text-to-video"),
        ({"input_video": [Image.new("RGB", (32, 32))] * 2, "denoising_strength": 0.5}, "input_video has 2 frames"),
        ({"num_inference_steps": 2.5}, "num_inference_steps=2.5 is not accepted"),  # not truncated to 2
        ({"max_sequence_length": 1000}, "max_sequence_length=1000 must be in 1..512"),
        ({"max_sequence_length": 0}, "max_sequence_length=0 must be in 1..512"),
        ({"cfg_scale_2": 3.0}, "cfg_scale_2: only a Wan 2.2 A14B pipeline has the low-noise expert"),
        ({"switch_DiT_boundary": 0.5}, "switch_DiT_boundary: only a Wan 2.2 A14B"),
        ({"denoising_strength": 0.5}, "denoising_strength=0.5 is how far video-to-video moves from input_video"),
        (
            {"input_video": [Image.new("RGB", (32, 32))] * 5, "denoising_strength": 0.1, "num_inference_steps": 4},
            "denoising_strength=0.1 with num_inference_steps=4 runs int",
        ),
    ],
)
def test_bad_input_names_the_argument(pipe, kwargs, fragment):
    prompt = kwargs.pop("prompt", PROMPT)
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        pipe(prompt, seed=0, **{**FAST, **kwargs})


# ----------------------------------------------------------------------------------------- Wan 2.2 A14B
def test_a14b_experts_hand_over_at_the_boundary_with_their_own_guidance(tiny_repo_factory, monkeypatch):
    from safetensors.torch import load_file

    repo = tiny_repo_factory("a14b")
    pipe = load(repo)
    for slot, folder in (("dit", "high_noise_model"), ("dit2", "low_noise_model")):
        expected = load_file(str(repo / folder / "diffusion_pytorch_model.safetensors"))["head.head.weight"]
        torch.testing.assert_close(getattr(pipe, slot).state_dict()["head.head.weight"], expected)

    seen = []
    real = WanVideoPipeline.predict

    def spy(self, dit, x, timestep, cond, uncond, scale, cfg_merge):
        seen.append(("dit" if dit is self.dit else "dit2", scale if uncond is not None else 1.0))
        return real(self, dit, x, timestep, cond, uncond, scale, cfg_merge)

    monkeypatch.setattr(WanVideoPipeline, "predict", spy)
    scheduler = FlowMatchScheduler("wan")
    scheduler.set_timesteps(4, shift=5.0)
    high = int((scheduler.timesteps >= 875).sum())
    assert 0 < high < 4
    run = {k: v for k, v in FAST.items() if k != "cfg_scale"} | {"num_inference_steps": 4, "switch_DiT_boundary": 0.875}
    pipe.defaults.update(cfg_scale=4.0, cfg_scale_2=3.0)  # as the Wan2.2-T2V-A14B preset
    pipe(PROMPT, seed=0, **run)
    assert seen == [("dit", 4.0)] * high + [("dit2", 3.0)] * (4 - high)
    seen.clear()
    pipe(PROMPT, seed=0, cfg_scale=2.0, **run)  # an explicit cfg_scale applies to both experts
    assert {s for _, s in seen} == {2.0}
    seen.clear()
    pipe(PROMPT, seed=0, cfg_scale=2.0, cfg_scale_2=1.0, **dict(run, switch_DiT_boundary=0.0))
    assert seen == [("dit", 2.0)] * 4  # boundary 0: the low-noise expert never runs


def test_model_configs_in_order_fill_dit_then_dit2(tiny_repo_factory):
    from diffsynth.runtime.hub import ModelConfig

    repo = tiny_repo_factory("a14b")
    configs = [
        ModelConfig(path=str(repo / "low_noise_model" / "diffusion_pytorch_model.safetensors")),  # named: goes to dit2
        ModelConfig(path=str(repo / "high_noise_model" / "diffusion_pytorch_model.safetensors")),
        ModelConfig(path=str(repo / "models_t5_umt5-xxl-enc-bf16.pth")),
        ModelConfig(path=str(repo / "Wan2.1_VAE.pth")),
    ]
    pipe = WanVideoPipeline.from_pretrained(
        torch_dtype="float32",
        device="cpu",
        model_configs=configs,
        tokenizer_config=ModelConfig(path=str(repo / "google" / "umt5-xxl")),
    )
    assert pipe.model_configs["dit2"] is configs[0] and pipe.model_configs["dit"] is configs[1]


def expert_configs(repo: Path) -> dict:
    """The A14B repo's files as ModelConfigs (DiffSynth-Studio's way of loading it), so no preset default applies."""
    from diffsynth.runtime.hub import ModelConfig

    names = (
        "high_noise_model/diffusion_pytorch_model.safetensors",
        "low_noise_model/diffusion_pytorch_model.safetensors",
    )
    files = (*names, "models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth")
    return dict(
        model_configs=[ModelConfig(path=str(repo / name)) for name in files],
        tokenizer_config=ModelConfig(path=str(repo / "google" / "umt5-xxl")),
    )


@pytest.mark.parametrize("value", [875, 1.5, -0.2, float("nan"), "0.9", True])
def test_a14b_boundary_outside_0_1_is_refused(tiny_repo_factory, value):
    """t / 1000 never leaves [0, 1]: 875 (meant 0.875) would run the high-noise expert for every step."""
    pipe = load(tiny_repo_factory("a14b"))
    with pytest.raises(ConfigError, match=re.escape(f"switch_DiT_boundary={value!r}")):
        pipe(PROMPT, seed=0, switch_DiT_boundary=value, **FAST)


def test_i2v_a14b_from_model_configs_hands_over_at_0_9(tiny_repo_factory, monkeypatch):
    """Without a preset the I2V experts hand over at 0.9 (the authors' I2V boundary), T2V and Fun ones at 0.875:
    at t = 890 the low-noise expert already runs."""
    pipe = WanVideoPipeline.from_pretrained(
        torch_dtype="float32", device="cpu", **expert_configs(tiny_repo_factory("i2v_a14b"))
    )
    assert "switch_DiT_boundary" not in pipe.defaults
    seen = []
    real = WanVideoPipeline.predict

    def spy(self, dit, *args):
        seen.append("dit" if dit is self.dit else "dit2")
        return real(self, dit, *args)

    monkeypatch.setattr(WanVideoPipeline, "predict", spy)
    pipe(PROMPT, seed=0, input_image=image(1), sigmas=[1.0, 0.89, 0.5], **dict(FAST, num_inference_steps=3))
    assert seen == ["dit", "dit2", "dit2"]
    for kind in ("a14b", "fun_a14b"):
        t2v_or_fun = WanVideoPipeline.from_pretrained(
            torch_dtype="float32", device="cpu", **expert_configs(tiny_repo_factory(kind))
        )
        assert t2v_or_fun.default_boundary() == 0.875


def test_input_video_file_is_read_as_its_frames(pipe, tmp_path):
    """A path to a video is loaded like vace_video / control_video, not split into characters."""
    from diffsynth.runtime.media import load_video, save_video

    path = tmp_path / "input.mp4"
    save_video([image(k) for k in range(5)], path, fps=16)
    run = dict(FAST, num_inference_steps=2)
    frames = pipe(PROMPT, input_video=load_video(path), denoising_strength=0.5, seed=3, output_type="pt", **run)
    for given in (str(path), path):
        got = pipe(PROMPT, input_video=given, denoising_strength=0.5, seed=3, output_type="pt", **run)
        torch.testing.assert_close(got, frames, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- first-block cache
def test_first_block_cache_in_the_pipeline(pipe):
    """Threshold 0 reuses nothing (same video); a loose one reuses the later steps' blocks, for the positive
    and the negative call each; `cfg_merge` makes it one call per step; turning it off restores the video."""
    options = {**FAST, "num_inference_steps": 4, "cfg_scale": 4.0, "negative_prompt": "bad quality", "tiled": False}
    plain = pipe(PROMPT, seed=0, output_type="pt", **options)
    caches = pipe.enable_first_block_cache(0.0)
    try:
        assert list(caches) == ["dit"] and pipe.step_caches() == caches  # no dit2 in a Wan 2.1 repo
        exact = pipe(PROMPT, seed=0, output_type="pt", **options)
        assert (caches["dit"].calls, caches["dit"].skipped) == (8, 0)
        torch.testing.assert_close(exact, plain, rtol=0, atol=0)
        loose = pipe.enable_first_block_cache(1e9)["dit"]
        approx = pipe(PROMPT, seed=0, output_type="pt", **options)
        assert (loose.calls, loose.skipped) == (8, 6)  # steps 2-4 reuse, positive and negative alike
        assert (approx - plain).abs().max() > 1e-4
        pipe(PROMPT, seed=0, output_type="pt", cfg_merge=True, **options)
        assert (loose.calls, loose.skipped) == (4, 3)  # a new run starts afresh; one batched call per step
    finally:
        pipe.disable_first_block_cache()
    assert pipe.step_caches() == {} and pipe.dit.step_cache is None
    torch.testing.assert_close(pipe(PROMPT, seed=0, output_type="pt", **options), plain, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- TeaCache
IDENTITY = (1.0, 0.0)  # a polynomial that passes the indicator's relative change through unchanged


def tea_reference(pipe, threshold, coefficients, steps, calls_per_step):
    from diffsynth.runtime.testing.tea_cache import TeaCacheReference

    dit = pipe.dit
    return TeaCacheReference(
        coefficients, threshold, steps, calls_per_step, dit.blocks[0], dit.blocks[-1],
        (dit.time_projection, lambda args, out: out),
    )  # fmt: skip


def run_against_reference(pipe, threshold, coefficients, options, cached) -> tuple[list[bool], float]:
    """The uncached pipeline under the hooked DiffSynth-Studio rule, then `cached()` (our TeaCache on the same
    `options`); checks the same calls ran in full and the videos agree. Returns the reuse pattern and how
    far the cached video is from the uncached one."""
    steps, cfg = options["num_inference_steps"], options.get("cfg_scale", 1.0)
    assert pipe.step_caches() == {}
    plain = pipe(PROMPT, seed=0, output_type="pt", **options)
    reference = tea_reference(pipe, threshold, coefficients, steps, 2 if cfg > 1 else 1)
    try:
        expected = pipe(PROMPT, seed=0, output_type="pt", **options)
    finally:
        reference.remove()
    ran = []
    hook = pipe.dit.blocks[-1].register_forward_hook(lambda m, i, o: ran.append(1))
    try:
        got = cached()
    finally:
        hook.remove()
    assert len(ran) == reference.reused.count(False), (len(ran), reference.reused)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    return reference.reused, float((got - plain).abs().max())


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_tea_cache_follows_diffsynth_studio(pipe, cfg_scale):
    """TeaCache gives the video DiffSynth-Studio's rule gives, re-enacted with hooks on the uncached DiT (the
    time modulation as indicator, one state per prompt): the same calls reused, the same video. An identity
    polynomial and a threshold among this tiny model's changes (0.36 to 1.07 per step) make some calls
    reused and some not, so every branch of the rule is taken."""
    options = {**FAST, "num_inference_steps": 10, "cfg_scale": cfg_scale, "negative_prompt": "bad", "tiled": False}
    caches = {}

    def cached():
        caches.update(pipe.enable_tea_cache(1.0, coefficients=IDENTITY))
        try:
            return pipe(PROMPT, seed=0, output_type="pt", **options)
        finally:
            pipe.disable_tea_cache()

    reused, changed = run_against_reference(pipe, 1.0, IDENTITY, options, cached)
    calls = len(reused)
    assert reused[0] is False and not any(reused[-(calls // 10) :]) and 2 <= sum(reused) <= calls - 4, reused
    assert (caches["dit"].calls, caches["dit"].skipped) == (calls, sum(reused))
    assert changed > 1e-4  # reusing changed the video: the test can tell a skip from a full call


def test_tea_cache_call_arguments_take_diffsynth_studio_model_ids(pipe):
    """`tea_cache_l1_thresh` / `tea_cache_model_id` (DiffSynth-Studio's call arguments) use that model's
    polynomial. This tiny model's changes lie far outside the range it was fitted on, where it is negative,
    so every call but the first and the last is reused, as DiffSynth-Studio would."""
    from diffsynth.wan.dit import TEA_CACHE_COEFFICIENTS

    options = {**FAST, "num_inference_steps": 6, "cfg_scale": 4.0, "negative_prompt": "bad", "tiled": False}
    call = {"tea_cache_l1_thresh": 0.2, "tea_cache_model_id": "Wan2.1-T2V-1.3B"}
    reused, changed = run_against_reference(
        pipe, 0.2, TEA_CACHE_COEFFICIENTS["Wan2.1-T2V-1.3B"], options,
        lambda: pipe(PROMPT, seed=0, output_type="pt", **call, **options),
    )  # fmt: skip
    assert reused == [False, False] + [True] * 8 + [False, False] and changed > 1e-4
    assert pipe.dit.step_cache is None  # the call's cache is gone afterwards


def test_tea_cache_enabled_on_the_pipeline_and_per_call(pipe):
    """`enable_tea_cache` gives the per-call argument's video and counts; a call's TeaCache leaves an enabled
    first-block cache in place; the model id is required (four polynomials) and checked."""
    options = {**FAST, "num_inference_steps": 6, "tiled": False}
    call = {"tea_cache_l1_thresh": 0.2, "tea_cache_model_id": "Wan2.1-T2V-14B"}
    per_call = pipe(PROMPT, seed=0, output_type="pt", **call, **options)
    caches = pipe.enable_tea_cache(0.2, model_id="Wan2.1-T2V-14B")
    try:
        assert list(caches) == ["dit"] and pipe.step_caches() == caches
        enabled = pipe(PROMPT, seed=0, output_type="pt", **options)
        assert (caches["dit"].calls, caches["dit"].skipped) == (6, 4)
        torch.testing.assert_close(enabled, per_call, rtol=0, atol=0)
    finally:
        pipe.disable_tea_cache()
    assert pipe.step_caches() == {}
    fbc = pipe.enable_first_block_cache(0.0)["dit"]
    try:
        pipe(PROMPT, seed=0, output_type="pt", **call, **options)
        assert pipe.dit.step_cache is fbc and fbc.calls == 0  # put back, unused during the call
        pipe.disable_tea_cache()
        assert pipe.dit.step_cache is fbc  # disabling TeaCache leaves the first-block cache alone
    finally:
        pipe.disable_first_block_cache()
    with pytest.raises(ConfigError, match="tea_cache_model_id.*Wan2.1-T2V-1.3B"):
        pipe(PROMPT, seed=0, tea_cache_l1_thresh=0.2, **options)
    with pytest.raises(ConfigError, match="'Wan2.2-T2V' is not a TeaCache model id.*Wan2.1-I2V-14B-720P"):
        pipe(PROMPT, seed=0, tea_cache_l1_thresh=0.2, tea_cache_model_id="Wan2.2-T2V", **options)
    with pytest.raises(ConfigError, match="threshold=-1.0 must be >= 0"):
        pipe.enable_tea_cache(-1, model_id="Wan2.1-T2V-14B")
    assert pipe.dit.step_cache is None


def test_first_block_cache_gives_each_a14b_expert_its_own_cache(tiny_repo_factory):
    """Both experts get a cache; the low-noise one starts without state when it takes over mid-loop (its
    first step runs every block), and each counts only its own calls."""
    pipe = load(tiny_repo_factory("a14b"))
    scheduler = FlowMatchScheduler("wan")
    scheduler.set_timesteps(4, shift=5.0)
    high = int((scheduler.timesteps >= 875).sum())
    low = 4 - high
    assert high >= 1 and low >= 2
    options = {**FAST, "num_inference_steps": 4, "switch_DiT_boundary": 0.875, "negative_prompt": "bad quality"}
    options.update(cfg_scale=4.0, cfg_scale_2=3.0, tiled=False)
    plain = pipe(PROMPT, seed=0, output_type="pt", **options)
    ran = []
    hooks = [
        block.register_forward_hook(lambda m, i, o, key=(slot, k): ran.append(key))
        for slot in ("dit", "dit2")
        for k, block in enumerate(getattr(pipe, slot).blocks)
    ]
    try:
        caches = pipe.enable_first_block_cache(0.0)
        assert sorted(caches) == ["dit", "dit2"] and caches["dit"] is not caches["dit2"]
        torch.testing.assert_close(pipe(PROMPT, seed=0, output_type="pt", **options), plain, rtol=0, atol=0)
        caches = pipe.enable_first_block_cache(1e9)
        ran.clear()
        approx = pipe(PROMPT, seed=0, output_type="pt", **options)
    finally:
        for hook in hooks:
            hook.remove()
        pipe.disable_first_block_cache()
    assert (caches["dit"].calls, caches["dit"].skipped) == (2 * high, 2 * (high - 1))
    assert (caches["dit2"].calls, caches["dit2"].skipped) == (2 * low, 2 * (low - 1))
    layers = len(pipe.dit.blocks)
    first_low = [key for key in ran if key[0] == "dit2"][: 2 * layers]
    assert first_low == [("dit2", k) for k in range(layers)] * 2  # positive and negative: every block
    assert ran.count(("dit2", layers - 1)) == 2 and ran.count(("dit", layers - 1)) == 2
    assert (approx - plain).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------- image conditioning
def test_i2v_conditions_on_mask_latent_and_clip(tiny_repo_factory):
    pipe = load(tiny_repo_factory("i2v"))
    assert type(pipe.image_encoder).__name__ == "WanImageEncoder"
    with pytest.raises(ConfigError, match="pass input_image"):
        pipe(PROMPT, seed=0, **FAST)
    with Calls(pipe.dit) as calls:
        pipe(PROMPT, input_image=image(1), seed=0, **FAST)
    _, (x, t, context), kwargs = calls[0]
    y, clip = kwargs["y"], kwargs["clip_feature"]
    assert x.shape == NOISE_SHAPE and context.shape == (1, 512, 32)
    assert y.shape == (1, 4 + 16, 2, 4, 4) and clip.shape == (1, 5, 128)
    assert torch.equal(y[:, :4, 0], torch.ones_like(y[:, :4, 0])) and torch.count_nonzero(y[:, :4, 1]) == 0
    video = torch.zeros(1, 3, 5, 32, 32)
    video[:, :, 0] = pil_to_tensor(image(1))
    torch.testing.assert_close(y[:, 4:], pipe.vae.encode(video, tiled=True), atol=1e-5, rtol=1e-5)

    with Calls(pipe.dit) as calls:  # first and last frame: the last in y; CLIP sees it only for FLF2V DiTs
        pipe(PROMPT, input_image=image(1), end_image=image(2), seed=0, **FAST)
    y, clip = calls[0][2]["y"], calls[0][2]["clip_feature"]
    assert clip.shape == (1, 5, 128)
    assert torch.equal(y[:, :4, 1, 0, 0], torch.tensor([[0.0, 0.0, 0.0, 1.0]]))  # the last of 4 folded frames


def test_ti2v_keeps_the_first_latent_frame_and_gives_it_timestep_zero(tiny_repo_factory):
    pipe = load(tiny_repo_factory("ti2v"))
    assert pipe.vae.z_dim == 48 and pipe.vae.spatial_compression == 16
    run = dict(FAST, num_inference_steps=3)
    first = pipe.vae.encode(pil_to_tensor(image(3))[:, :, None], tiled=True)
    with Calls(pipe.dit) as calls:
        frames = pipe(PROMPT, input_image=image(3), seed=0, **run)
    assert len(frames) == 5 and len(calls) == 3
    tokens_per_frame = (32 // 16 // 2) ** 2
    for _, (x, t, _), _ in calls:
        torch.testing.assert_close(x[:, :, :1], first, atol=1e-5, rtol=1e-5)
        assert t.shape == (1, 2 * tokens_per_frame)
        assert torch.count_nonzero(t[:, :tokens_per_frame]) == 0 and (t[:, tokens_per_frame:] > 0).all()
    with Calls(pipe.dit) as calls:  # text-to-video with the same model: one timestep per sample
        pipe(PROMPT, seed=0, **run)
    assert calls[0][1][1].shape == (1,)


def test_vram_managed_models_give_the_same_video(tiny_repo_factory):
    """Every unit streamed (a limit far below the models): the stages activate what they use in time."""
    pipe = load(tiny_repo_factory("i2v"))
    run = dict(FAST, input_image=image(4), seed=0, output_type="pt")
    expected = pipe(PROMPT, **run)
    pipe.enable_vram_management(slots=["dit", "text_encoder", "image_encoder"], vram_limit=1e-6)
    torch.testing.assert_close(pipe(PROMPT, **run), expected, rtol=0, atol=0)


def test_vram_managed_vae_gives_the_same_video(tiny_repo):
    pipe = load(tiny_repo)
    expected = pipe(PROMPT, seed=0, output_type="pt", **FAST)
    pipe.enable_vram_management(slots=["vae"], vram_limit=1e-6)
    torch.testing.assert_close(pipe(PROMPT, seed=0, output_type="pt", **FAST), expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- folders, CLI, presets
def test_cli_generates_an_mp4_from_a_local_folder(tiny_repo, tmp_path):
    import av

    from diffsynth.runtime.cli import main

    repo = shutil.copytree(tiny_repo, tmp_path / "repo")
    defaults = {"num_frames": 5, "height": 32, "width": 32, "num_inference_steps": 2, "cfg_scale": 1.0}
    (repo / "diffsynth.json").write_text(json.dumps({"defaults": defaults}))
    out = tmp_path / "video.mp4"
    args = ["generate", "--model", str(repo), "--prompt", PROMPT, "--output", str(out), "--device", "cpu"]
    assert main([*args, "--dtype", "float32"]) == 0
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 5


def run_cli(repo, tmp_path, monkeypatch, *flags: str) -> tuple[dict, list, Path]:
    """`diffsynth generate` on a copy of `repo` (5 frames of 32 x 32, 2 steps, no guidance) with `flags`: the keyword
    arguments the pipeline got from the CLI, what it returned, and the mp4 written."""
    from diffsynth.runtime.cli import main

    repo = shutil.copytree(repo, tmp_path / "repo")
    defaults = {"num_frames": 5, "height": 32, "width": 32, "num_inference_steps": 2, "cfg_scale": 1.0}
    (repo / "diffsynth.json").write_text(json.dumps({"defaults": defaults}))
    out, seen, results = tmp_path / "out.mp4", {}, []
    real = WanVideoPipeline.__call__

    @functools.wraps(real)  # the CLI reads the signature to know which options the pipeline takes
    def spy(self, prompt, **kwargs):
        seen.update(kwargs)
        results.append(real(self, prompt, **kwargs))
        return results[-1]

    monkeypatch.setattr(WanVideoPipeline, "__call__", spy)
    args = ["generate", "--model", str(repo), "--prompt", PROMPT, "--output", str(out), "--device", "cpu"]
    assert main([*args, "--dtype", "float32", *flags]) == 0
    return seen, results, out


def test_cli_video_to_video(tiny_repo, tmp_path, monkeypatch):
    """`--input-video` with `--denoising-strength` is Wan's video-to-video: the pipeline gets the file's frames
    as `input_video` and the strength, and the mp4 is written."""
    from diffsynth.runtime.media import load_video, save_video

    given = tmp_path / "given.mp4"
    save_video([image(k) for k in range(5)], given, fps=16)
    seen, _, out = run_cli(tiny_repo, tmp_path, monkeypatch, "--input-video", str(given), "--denoising-strength", "0.5")
    want = load_video(given)
    assert len(seen["input_video"]) == 5
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(want, seen["input_video"], strict=True))
    assert seen["denoising_strength"] == 0.5 and out.exists() and len(load_video(out)) == 5


def test_cli_tea_cache_flags(tiny_repo, tmp_path, caplog, capsys):
    """`--tea-cache` with `--tea-cache-model-id` turns TeaCache on (the log counts what it reused: with 3 steps
    the middle one); a model id alone, or both caches at once, are refused naming the flags."""
    from diffsynth.runtime.cli import main

    repo = shutil.copytree(tiny_repo, tmp_path / "repo")
    defaults = {"num_frames": 5, "height": 32, "width": 32, "num_inference_steps": 3, "cfg_scale": 1.0}
    (repo / "diffsynth.json").write_text(json.dumps({"defaults": defaults}))
    args = ["generate", "--model", str(repo), "--prompt", PROMPT, "--output", str(tmp_path / "v.mp4")]
    args += ["--device", "cpu", "--dtype", "float32"]
    with caplog.at_level("INFO", logger="diffsynth"):
        assert main([*args, "--tea-cache", "0.2", "--tea-cache-model-id", "Wan2.1-T2V-1.3B"]) == 0
    assert "TeaCache (dit): 1 of 3 model calls reused" in caplog.text
    assert main([*args, "--tea-cache-model-id", "Wan2.1-T2V-1.3B"]) == 2
    assert "give --tea-cache THRESHOLD with it" in capsys.readouterr().err
    assert main([*args, "--tea-cache", "0.2", "--first-block-cache", "0.1"]) == 2
    assert "choose one" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kind, preset",
    [
        ("t2v", "Wan-AI/Wan2.1-T2V-1.3B"),
        ("i2v", "Wan-AI/Wan2.1-I2V-14B-480P"),
        ("a14b", "Wan-AI/Wan2.2-T2V-A14B"),
        ("ti2v", "Wan-AI/Wan2.2-TI2V-5B"),
        ("vace", "Wan-AI/Wan2.1-VACE-1.3B"),
        ("vace", "iic/VACE-Wan2.1-1.3B-Preview"),
        ("vace_a14b", "PAI/Wan2.2-VACE-Fun-A14B"),
        ("fun_control", "PAI/Wan2.1-Fun-V1.1-1.3B-Control"),
    ],
)
def test_presets_find_their_files_in_the_hub_layout(tiny_repo_factory, tmp_path, monkeypatch, kind, preset):
    """A preset's (model_id, pattern) files resolve in a local copy laid out like the hub repo (no download)."""
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    repo = tiny_repo_factory(kind)
    shutil.copytree(repo, tmp_path / preset)
    tokenizer = tmp_path / "Wan-AI" / "Wan2.1-T2V-1.3B" / "google" / "umt5-xxl"  # every preset's tokenizer
    if not tokenizer.exists():
        shutil.copytree(repo / "google" / "umt5-xxl", tokenizer)
    pipe = WanVideoPipeline.from_pretrained(preset, torch_dtype="float32", device="cpu")
    assert pipe.tokenizer is not None and (pipe.dit2 is not None) == kind.endswith("a14b")
    assert (pipe.image_encoder is not None) == (kind in ("i2v", "fun_control"))
    steps = {"t2v": 50, "i2v": 40, "a14b": 40, "ti2v": 50, "vace": 50, "vace_a14b": 40, "fun_control": 50}
    assert pipe.defaults["num_inference_steps"] == steps[kind]
    assert bool(pipe.dit.config.vace_layers) == kind.startswith("vace")
    if kind == "vace_a14b":
        assert pipe.dit2.config.vace_layers == pipe.dit.config.vace_layers


@pytest.mark.parametrize(
    ("kind", "preset", "base", "folder"),
    [
        ("a14b", "lightx2v/Wan2.2-Lightning", "Wan-AI/Wan2.2-T2V-A14B", "Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1"),
        ("i2v_a14b", "lightx2v/Wan2.2-Lightning:i2v", "Wan-AI/Wan2.2-I2V-A14B", "Wan2.2-I2V-A14B-4steps-lora-rank64-Seko-V1"),
    ],
)  # fmt: skip
def test_lightning_presets_fuse_one_lora_per_expert(
    tiny_repo_factory, tmp_path, monkeypatch, kind, preset, base, folder
):
    """`lightx2v/Wan2.2-Lightning` (and `:i2v`): the A14B experts with their own Lightning LoRA each fused (the
    high-noise expert's into `dit`, the low-noise one's into `dit2`, in their ComfyUI-style `diffusion_model.` keys),
    sampled in 4 unguided Euler steps at shift 5."""
    from safetensors.torch import save_file

    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    repo = tiny_repo_factory(kind)
    shutil.copytree(repo, tmp_path / base)
    shutil.copytree(repo / "google" / "umt5-xxl", tmp_path / "Wan-AI" / "Wan2.1-T2V-1.3B" / "google" / "umt5-xxl")
    plain = WanVideoPipeline.from_pretrained(base, torch_dtype="float32", device="cpu")
    g = torch.Generator().manual_seed(3)
    files = {}
    for expert, slot in (("high", "dit"), ("low", "dit2")):
        q = getattr(plain, slot).get_submodule("blocks.0.self_attn.q")
        state = {
            "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(2, q.in_features, generator=g),
            "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(q.out_features, 2, generator=g),
            "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(2.0),
        }
        files[slot] = tmp_path / preset.split(":")[0] / folder / f"{expert}_noise_model.safetensors"
        files[slot].parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(files[slot]))
    pipe = WanVideoPipeline.from_pretrained(preset, torch_dtype="float32", device="cpu")
    for slot in ("dit", "dit2"):
        plain.load_lora(str(files[slot]), slot=slot)
        ours, want = getattr(pipe, slot).state_dict(), getattr(plain, slot).state_dict()
        assert all(torch.equal(ours[k], want[k]) for k in want), slot
    fresh = WanVideoPipeline.from_pretrained(base, torch_dtype="float32", device="cpu")
    for slot in ("dit", "dit2"):  # each expert changed by its own LoRA
        key = "blocks.0.self_attn.q.weight"
        assert not torch.equal(getattr(pipe, slot).state_dict()[key], getattr(fresh, slot).state_dict()[key])
    d = pipe.defaults
    assert (d["num_inference_steps"], d["cfg_scale"], d["cfg_scale_2"], d["sigma_shift"]) == (4, 1.0, 1.0, 5.0)


def test_krea_realtime_video_preset_loads_its_model_prefixed_file(tiny_repo, tmp_path, monkeypatch):
    """krea/krea-realtime-video's single file (the DiT's keys under `model.`) beside Wan2.1-T2V-14B's encoders and
    VAE: the same DiT as the original-named file, sampled with the preset's 6 unguided steps."""
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    (tmp_path / "krea" / "krea-realtime-video").mkdir(parents=True)
    state = load_file(str(tiny_repo / "diffusion_pytorch_model.safetensors"))
    save_file(
        {f"model.{k}": v for k, v in state.items()},
        str(tmp_path / "krea/krea-realtime-video/krea-realtime-video-14b.safetensors"),
    )
    # the tiny DiT's head count is not in its shapes (the released 14B's is: dim 5120 / 128): its config.json says it
    shutil.copy(tiny_repo / "config.json", tmp_path / "krea" / "krea-realtime-video" / "config.json")
    wan14b = tmp_path / "Wan-AI" / "Wan2.1-T2V-14B"
    wan14b.mkdir(parents=True)
    for name in ("models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth"):
        shutil.copy(tiny_repo / name, wan14b / name)
    shutil.copytree(tiny_repo / "google" / "umt5-xxl", tmp_path / "Wan-AI" / "Wan2.1-T2V-1.3B" / "google" / "umt5-xxl")
    pipe = WanVideoPipeline.from_pretrained("krea/krea-realtime-video", torch_dtype="float32", device="cpu")
    reference = load(tiny_repo)
    assert all(torch.equal(v, reference.dit.state_dict()[k]) for k, v in pipe.dit.state_dict().items())
    assert pipe.defaults["num_inference_steps"] == 6 and pipe.defaults["sigma_shift"] == 20.0
    fast = {k: v for k, v in FAST.items() if k not in ("num_inference_steps", "cfg_scale")}
    video = pipe(PROMPT, seed=0, output_type="pt", **fast)
    torch.testing.assert_close(
        video,
        reference(PROMPT, seed=0, output_type="pt", num_inference_steps=6, cfg_scale=1.0, sigma_shift=20.0, **fast),
    )


def test_presets_are_data_with_the_authors_defaults():
    from diffsynth.runtime.registry import installed_families

    presets = installed_families()["wan"].presets
    names = ["Wan2.1-T2V-1.3B", "Wan2.1-T2V-14B", "Wan2.1-I2V-14B-480P", "Wan2.1-I2V-14B-720P", "Wan2.1-FLF2V-14B-720P"]
    names += ["Wan2.1-VACE-1.3B", "Wan2.1-VACE-14B", "Wan2.2-TI2V-5B", "Wan2.2-T2V-A14B", "Wan2.2-I2V-A14B"]
    names += ["Wan2.2-Animate-14B", "Wan2.2-S2V-14B", "Wan2.2-Animate-2-14B", "Wan2.2-Animate-2-14B:distilled"]
    names += ["Wan-Dancer-14B:global", "Wan-Dancer-14B:local"]
    fun = [f"Wan2.1-Fun-{n}-{k}" for n in ("1.3B", "14B", "V1.1-1.3B", "V1.1-14B") for k in ("Control", "InP")]
    fun += ["Wan2.2-Fun-A14B-Control", "Wan2.2-Fun-A14B-InP", "Wan2.2-VACE-Fun-A14B"]
    fun += ["Wan2.1-Fun-V1.1-1.3B-Control-Camera", "Wan2.1-Fun-V1.1-14B-Control-Camera"]
    fun += ["Wan2.2-Fun-A14B-Control-Camera"]
    others = [
        "DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1",
        "krea/krea-realtime-video",
        "iic/VACE-Wan2.1-1.3B-Preview",
        "meituan-longcat/LongCat-Video",
        "meituan-longcat/LongCat-Video:distill",
        "lightx2v/Wan2.2-Lightning",
        "lightx2v/Wan2.2-Lightning:i2v",
        "ByteDance/Video-As-Prompt-Wan2.1-14B",
    ]
    assert sorted(presets) == sorted([*(f"Wan-AI/{n}" for n in names), *(f"PAI/{n}" for n in fun), *others])
    krea = presets["krea/krea-realtime-video"]
    assert (krea.defaults["num_inference_steps"], krea.defaults["cfg_scale"], krea.defaults["sigma_shift"]) == (
        6,
        1,
        20,
    )
    assert [f.model_id for f in krea.files] == [
        "krea/krea-realtime-video",
        "Wan-AI/Wan2.1-T2V-14B",
        "Wan-AI/Wan2.1-T2V-14B",
    ]
    assert presets["PAI/Wan2.2-VACE-Fun-A14B"].defaults == presets["Wan-AI/Wan2.2-T2V-A14B"].defaults
    a14b = presets["Wan-AI/Wan2.2-T2V-A14B"]
    assert [f.origin_file_pattern for f in a14b.files][:2] == [
        "high_noise_model/diffusion_pytorch_model*.safetensors",
        "low_noise_model/diffusion_pytorch_model*.safetensors",
    ]
    assert (a14b.defaults["sigma_shift"], a14b.defaults["cfg_scale"], a14b.defaults["cfg_scale_2"]) == (12.0, 4.0, 3.0)
    assert presets["Wan-AI/Wan2.2-I2V-A14B"].defaults["switch_DiT_boundary"] == 0.9
    assert presets["Wan-AI/Wan2.1-I2V-14B-480P"].defaults["sigma_shift"] == 3.0
    assert (
        presets["Wan-AI/Wan2.1-VACE-1.3B"].defaults["sigma_shift"]
        == presets["Wan-AI/Wan2.1-VACE-14B"].defaults["sigma_shift"]
        == 16.0
    )
    ti2v = presets["Wan-AI/Wan2.2-TI2V-5B"].defaults
    assert (ti2v["num_frames"], ti2v["height"], ti2v["width"]) == (121, 704, 1280)
    own = {"Wan-AI/Wan2.2-Animate-2-14B", "Wan-AI/Wan2.2-Animate-2-14B:distilled"}  # the repo's own umT5 folder
    assert all(p.tokenizer.origin_file_pattern == "google/umt5-xxl/" for n, p in presets.items() if n not in own)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="Wan-AI/Wan2.1-T2V-1.3B"):
        WanVideoPipeline.from_pretrained("Wan-AI/No-Such-Model")


# ----------------------------------------------------------------------------------------- parity with diffusers
def diffusers_dit(folder):
    """diffusers' WanTransformer3DModel with the weights of a tiny repo DiT (through diffusers' own converter)."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from safetensors.torch import load_file

    c = json.loads((folder / "config.json").read_text())
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    with_clip = "img_emb.proj.1.weight" in state
    image = {"image_dim": state["img_emb.proj.1.weight"].shape[1], "added_kv_proj_dim": c["dim"]} if with_clip else {}
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=c["num_heads"],
        attention_head_dim=c["dim"] // c["num_heads"],
        in_channels=c["in_dim"],
        out_channels=c["out_dim"],
        text_dim=c["text_dim"],
        freq_dim=c["freq_dim"],
        ffn_dim=c["ffn_dim"],
        num_layers=c["num_layers"],
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        **image,
    )
    model.load_state_dict(convert_wan_transformer_to_diffusers(state))
    return model.eval()


def diffusers_parts(repo, ours):
    import diffusers
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    from transformers import AutoTokenizer, UMT5EncoderModel

    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16)  # released latent statistics are its defaults
    vae.load_state_dict(convert_wan_vae_to_diffusers(torch.load(repo / "Wan2.1_VAE.pth")))
    text_encoder = UMT5EncoderModel(ours.text_encoder.config)
    text_encoder.load_state_dict(ours.text_encoder.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(repo / "google" / "umt5-xxl")
    return dict(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer)


def euler(shift: float, steps: int):
    """diffusers' Euler scheduler and its sigmas (it shifts its grid twice, so ours is fed its sigmas)."""
    import diffusers

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    probe = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    probe.set_timesteps(steps)
    return scheduler, probe.sigmas[:-1].clone()


PARITY = {"height": 32, "width": 32, "num_frames": 5, "output_type": "np"}


@pytest.mark.parity
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_t2v_matches_diffusers(tiny_repo, pipe, guidance):
    diffusers = pytest.importorskip("diffusers")
    scheduler, sigmas = euler(5.0, 3)
    ref = diffusers.WanPipeline(
        scheduler=scheduler, transformer=diffusers_dit(tiny_repo), **diffusers_parts(tiny_repo, pipe)
    )
    ref.set_progress_bar_config(disable=True)
    prompts, negative = [PROMPT, "a yellow triangle on a black background"], ["bad quality, blurry"] * 2
    noise = torch.randn((2, *NOISE_SHAPE[1:]), generator=torch.Generator().manual_seed(11))
    expected = ref(
        prompt=list(prompts), negative_prompt=list(negative), guidance_scale=guidance, num_inference_steps=3,
        latents=noise.clone(), **PARITY,
    ).frames  # fmt: skip
    got = pipe(
        prompts, negative_prompt=negative, cfg_scale=guidance, sigmas=sigmas, latents=noise.clone(), tiled=False,
        progress_bar=False, **PARITY,
    )  # fmt: skip
    assert got.shape == expected.shape == (2, 5, 32, 32, 3)
    assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.parity
def test_a14b_matches_diffusers_two_experts(tiny_repo_factory):
    diffusers = pytest.importorskip("diffusers")
    repo = tiny_repo_factory("a14b")
    ours = load(repo)
    scheduler, sigmas = euler(5.0, 4)
    assert 0 < int((sigmas * 1000 >= 875).sum()) < 4  # both experts run
    ref = diffusers.WanPipeline(
        scheduler=scheduler,
        transformer=diffusers_dit(repo / "high_noise_model"),
        transformer_2=diffusers_dit(repo / "low_noise_model"),
        boundary_ratio=0.875,
        **diffusers_parts(repo, ours),
    )
    ref.set_progress_bar_config(disable=True)
    noise = torch.randn(NOISE_SHAPE, generator=torch.Generator().manual_seed(12))
    expected = ref(
        prompt=PROMPT, negative_prompt="bad quality", guidance_scale=4.0, guidance_scale_2=3.0, num_inference_steps=4,
        latents=noise.clone(), **PARITY,
    ).frames  # fmt: skip
    got = ours(
        PROMPT, negative_prompt="bad quality", cfg_scale=4.0, cfg_scale_2=3.0, switch_DiT_boundary=0.875, sigmas=sigmas,
        latents=noise.clone(), tiled=False, progress_bar=False, **PARITY,
    )  # fmt: skip
    assert np.abs(got - expected).max() <= 1e-4


class WanClipProcessor:
    """Stands in for diffusers' CLIPImageProcessor (resize the short side + centre crop) with the authors'
    preprocessing (stretch to the square), so both pipelines feed CLIP the same pixels."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, images, return_tensors="pt"):
        from transformers import BatchFeature

        from diffsynth.wan.image_encoder import preprocess

        return BatchFeature({"pixel_values": preprocess(images, self.size)})


@pytest.mark.parity
def test_i2v_matches_diffusers(tiny_repo_factory, tiny_sizes, monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.wan import pipeline_wan_i2v
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if not hasattr(pipeline_wan_i2v, "ftfy"):  # its prompt cleaning calls ftfy without checking it is installed
        monkeypatch.setattr(
            pipeline_wan_i2v, "ftfy", type("NoFtfy", (), {"fix_text": staticmethod(str)}), raising=False
        )

    repo = tiny_repo_factory("i2v")
    ours = load(repo)
    clip = CLIPVisionModel(CLIPVisionConfig(**tiny_sizes.clip))
    clip.load_state_dict({k: v for k, v in ours.image_encoder.state_dict().items()})
    scheduler, sigmas = euler(3.0, 3)
    ref = diffusers.WanImageToVideoPipeline(
        scheduler=scheduler,
        transformer=diffusers_dit(repo),
        image_encoder=clip.eval(),
        image_processor=WanClipProcessor(tiny_sizes.clip["image_size"]),
        **diffusers_parts(repo, ours),
    )
    ref.set_progress_bar_config(disable=True)
    noise = torch.randn(NOISE_SHAPE, generator=torch.Generator().manual_seed(13))
    first = image(21)  # already 32x32: neither pipeline resamples it
    expected = ref(
        image=first, prompt=PROMPT, negative_prompt="bad quality", guidance_scale=5.0, num_inference_steps=3,
        latents=noise.clone(), **PARITY,
    ).frames  # fmt: skip
    got = ours(
        PROMPT, negative_prompt="bad quality", input_image=first, cfg_scale=5.0, sigmas=sigmas, latents=noise.clone(),
        tiled=False, progress_bar=False, **PARITY,
    )  # fmt: skip
    assert np.abs(got - expected).max() <= 1e-4


def _count_full_calls(transformer) -> list:
    """Calls that ran the last block's own forward (the feed-forward inside it runs only then: diffusers'
    cache hook returns without calling the block when it reuses), recorded on that feed-forward."""
    calls = []
    transformer.blocks[-1].ffn.register_forward_hook(lambda m, i, o: calls.append(1))
    return calls


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["t2v", "a14b"])
def test_first_block_cache_matches_diffusers(tiny_repo, tiny_repo_factory, kind):
    """diffusers' `FirstBlockCacheConfig` on its Wan transformer(s) and our `enable_first_block_cache` at the same
    threshold: the same calls are reused (per expert, positive and negative apart: diffusers' "cond"/"uncond"
    cache contexts are our call positions) and the videos agree. The thresholds sit between the relative
    changes these tiny random models show, so that some calls are reused and some are not (t2v: 8 of 16;
    A14B: 4 of the high-noise expert's 6, 4 of the low-noise one's 10)."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.hooks import FirstBlockCacheConfig

    threshold, steps = 0.85, 8  # the relative changes here: 0.38 to 1.33, none within 0.04 of 0.85
    repo = tiny_repo if kind == "t2v" else tiny_repo_factory("a14b")
    ours = load(repo)
    scheduler, sigmas = euler(5.0, steps)
    if kind == "t2v":
        experts = {"transformer": diffusers_dit(repo)}
    else:
        experts = {"transformer": diffusers_dit(repo / "high_noise_model")}
        experts["transformer_2"] = diffusers_dit(repo / "low_noise_model")
        assert 0 < int((sigmas * 1000 >= 875).sum()) < steps  # both experts run
    ref = diffusers.WanPipeline(
        scheduler=scheduler, **experts, **({"boundary_ratio": 0.875} if kind == "a14b" else {}),
        **diffusers_parts(repo, ours),
    )  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    full = {}
    for name, transformer in experts.items():
        transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        full[name] = _count_full_calls(transformer)
    noise = torch.randn(NOISE_SHAPE, generator=torch.Generator().manual_seed(11))
    guidance = {"t2v": {}, "a14b": {"guidance_scale_2": 3.0}}[kind]
    expected = ref(
        prompt=PROMPT, negative_prompt="bad quality", guidance_scale=4.0, num_inference_steps=steps,
        latents=noise.clone(), **guidance, **PARITY,
    ).frames  # fmt: skip
    caches = ours.enable_first_block_cache(threshold)
    ours_full = {slot: _count_full_calls(getattr(ours, slot)) for slot in caches}
    got = ours(
        PROMPT, negative_prompt="bad quality", cfg_scale=4.0, sigmas=sigmas, latents=noise.clone(), tiled=False,
        progress_bar=False, **({"cfg_scale_2": 3.0, "switch_DiT_boundary": 0.875} if kind == "a14b" else {}),
        **PARITY,
    )  # fmt: skip
    for slot, name in (("dit", "transformer"), ("dit2", "transformer_2"))[: len(experts)]:
        cache = caches[slot]
        print(f"{kind} {slot}: {cache}, diffusers ran the last block {len(full[name])} times")
        assert 0 < cache.skipped < cache.calls, f"{slot}: threshold {threshold} should reuse some calls, not all"
        assert len(ours_full[slot]) == cache.calls - cache.skipped
        assert len(full[name]) == len(ours_full[slot]), f"{slot}: diffusers and we reuse different calls"
    diff = np.abs(got - expected).max()
    print(f"first-block cache parity ({kind}, threshold {threshold}): max abs {diff:.3g}")
    assert diff <= 1e-4


def test_cli_options_leave_other_dits_alone(pipe):
    """Only Wan-Dancer renames the CLI's inputs (`cli_options`); a text-to-video DiT gets them as given."""
    options = {"input_image": "a.png", "retake_audio": "b.wav", "control_video": "c.mp4"}
    assert pipe.cli_options(options) == options

"""The two-stage LTX-2 pipeline (half size, latent upsampler, 3 distilled steps with the distilled LoRA) against
diffusers' documented two-stage recipe, LTX-2 LoRA files in both layouts, and the settings' errors."""

from __future__ import annotations

import diffsynth_ltx2_test_repo as repo_module  # loaded by conftest
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffsynth.ltx2.pipeline import LTX2Pipeline
from diffsynth.ltx2.presets import PRESETS
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.lora import LoRAError, list_loras

CAPTIONS = repo_module.CAPTIONS
F, H, W = repo_module.FRAMES, repo_module.HEIGHT, repo_module.WIDTH  # the first stage's size
STRENGTH = 0.8


tiny_upsampler, lora_state, RANK = repo_module.tiny_upsampler, repo_module.lora_state, repo_module.LORA_RANK


@pytest.fixture(scope="module")
def stage_two_files(tiny_ltx2_base, tiny_ltx2_pipe):
    return repo_module.write_two_stage_files(tiny_ltx2_base / "two-stage", tiny_ltx2_pipe.dit)


@pytest.fixture(scope="module")
def two_stage_pipe(tiny_ltx2_base, stage_two_files):
    upsampler, lora = stage_two_files
    return repo_module.our_pipeline(
        tiny_ltx2_base, model_configs=[ModelConfig(path=str(upsampler))], stage2_lora_config=str(lora)
    )


SETTINGS = dict(
    height=2 * H,
    width=2 * W,
    num_frames=F,
    max_sequence_length=repo_module.MAX_SEQUENCE_LENGTH,
    stg_scale=0.0,
    modality_scale=1.0,
    guidance_rescale=0.0,
    progress_bar=False,
)


# ----------------------------------------------------------------------------------------- parity
@pytest.mark.parity
def test_matches_diffusers_two_stage_recipe(tiny_ltx2_base, tiny_ltx2_pipe, two_stage_pipe, stage_two_files):
    """diffusers' documented two-stage recipe on the same weights: `LTX2Pipeline` at half size with CFG to
    latents, `LTX2LatentUpsamplePipeline`, then `LTX2Pipeline` again with the distilled LoRA at 0.8 (fused
    here from diffusers' own key conversion: its loader needs peft), re-noised to the first stage-2 sigma,
    the 3 stage-2 sigmas, no guidance; one generator through both stages."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel
    from diffusers.pipelines.ltx2.utils import STAGE_2_DISTILLED_SIGMA_VALUES

    _, lora_file = stage_two_files
    reference = repo_module.reference_pipeline(tiny_ltx2_pipe, tiny_ltx2_base)
    reference.set_progress_bar_config(disable=True)
    reference.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 3, 3), mu=2.05)
    stage_1_sigmas = reference.scheduler.sigmas.clone()  # diffusers' own (1e-7 apart from our template's)
    frames, audio = two_stage_pipe(
        CAPTIONS[0], negative_prompt=CAPTIONS[3], seed=3, cfg_scale=3.0, audio_cfg_scale=5.0, sigmas=stage_1_sigmas,
        use_two_stage_pipeline=True, output_type="np", **SETTINGS,
    )  # fmt: skip
    assert list_loras(two_stage_pipe.dit) == {}  # the stage-2 LoRA is gone again

    generator = torch.Generator().manual_seed(3)
    common = dict(
        prompt=CAPTIONS[0], negative_prompt=CAPTIONS[3], num_frames=F, frame_rate=24.0, stg_scale=0.0,
        audio_stg_scale=0.0, modality_scale=1.0, audio_modality_scale=1.0, guidance_rescale=0.0,
        audio_guidance_rescale=0.0, generator=generator, max_sequence_length=SETTINGS["max_sequence_length"],
        return_dict=False,
    )  # fmt: skip
    video_latents, audio_latents = reference(
        height=H, width=W, num_inference_steps=3, guidance_scale=3.0, audio_guidance_scale=5.0,
        output_type="latent", **common,
    )  # fmt: skip
    upsampler = LTX2LatentUpsamplerModel(in_channels=8, mid_channels=32, num_blocks_per_stage=1).eval()
    upsampler.load_state_dict(tiny_upsampler().state_dict(), strict=True)
    upsample = diffusers.LTX2LatentUpsamplePipeline(vae=reference.vae, latent_upsampler=upsampler)
    upscaled = upsample(latents=video_latents, output_type="latent", return_dict=False)[0]
    repo_module.fuse_lora(reference.transformer, diffusers.LTX2Pipeline.lora_state_dict(str(lora_file)), STRENGTH)
    reference.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(
        reference.scheduler.config, use_dynamic_shifting=False, shift_terminal=None
    )
    expected_frames, expected_audio = reference(
        latents=upscaled, audio_latents=audio_latents, height=2 * H, width=2 * W, num_inference_steps=3,
        noise_scale=STAGE_2_DISTILLED_SIGMA_VALUES[0], sigmas=STAGE_2_DISTILLED_SIGMA_VALUES, guidance_scale=1.0,
        audio_guidance_scale=1.0, output_type="np", **common,
    )  # fmt: skip

    assert frames.shape == expected_frames.shape == (1, F, 2 * H, 2 * W, 3)
    assert expected_frames.std() > 0.05
    frame_diff = np.abs(frames - expected_frames).max()
    audio_diff = (repo_module.decoded_sound(audio.waveform, expected_audio) - expected_audio).abs().max().item()
    print(f"two-stage parity: frames max abs {frame_diff:.3g}, audio max abs {audio_diff:.3g}")
    assert frame_diff <= 1e-5 and audio_diff <= 1e-5


# ----------------------------------------------------------------------------------------- behaviour
def test_stages_run_at_half_and_full_size_with_the_lora_only_in_stage_two(two_stage_pipe, monkeypatch):
    seen = []
    real = LTX2Pipeline.predict

    def spy(self, video, audio, sigma, text, *args, **kwargs):
        seen.append((tuple(video.shape[-2:]), round(float(sigma), 6), bool(list_loras(self.dit)), text.video.shape[0]))
        return real(self, video, audio, sigma, text, *args, **kwargs)

    monkeypatch.setattr(LTX2Pipeline, "predict", spy)
    two_stage_pipe(CAPTIONS[1], seed=0, num_inference_steps=2, use_two_stage_pipeline=True, **SETTINGS)
    h, w = H // 32, W // 32
    assert [s[0] for s in seen] == [(h, w)] * 2 + [(2 * h, 2 * w)] * 3
    assert [s[1] for s in seen[2:]] == [0.909375, 0.725, 0.421875]
    assert [s[2] for s in seen] == [False, False, True, True, True]  # the distilled LoRA in stage 2 only
    assert [s[3] for s in seen] == [2, 2, 1, 1, 1]  # CFG in stage 1 only


def test_stage_two_changes_the_result_and_runs_again_the_same(two_stage_pipe):
    kwargs = dict(seed=1, num_inference_steps=2, output_type="pt", **SETTINGS)
    first = two_stage_pipe(CAPTIONS[2], use_two_stage_pipeline=True, **kwargs)
    again = two_stage_pipe(CAPTIONS[2], use_two_stage_pipeline=True, **kwargs)
    torch.testing.assert_close(again[0], first[0], atol=0, rtol=0)
    weaker = two_stage_pipe(CAPTIONS[2], use_two_stage_pipeline=True, stage2_lora_strength=0.0, **kwargs)
    assert (weaker[0] - first[0]).abs().max() > 1e-3  # the LoRA is applied, at its strength
    one_stage = two_stage_pipe(CAPTIONS[2], **kwargs)
    assert one_stage[0].shape == first[0].shape  # one stage samples the full size directly


def test_first_block_cache_restarts_for_stage_two(two_stage_pipe, monkeypatch):
    """Each stage is its own denoising loop: the cache's counts and states start afresh in stage 2, whose first
    call runs every block (then the 2 later ones reuse), with the distilled LoRA attached."""
    seen = []
    real = LTX2Pipeline.denoise
    dit = two_stage_pipe.dit
    last_block = []
    hook = dit.transformer_blocks[-1].register_forward_hook(lambda m, i, o: last_block.append(1))

    def spy(self, *args, **kwargs):
        last_block.clear()
        out = real(self, *args, **kwargs)
        seen.append((cache.calls, cache.skipped, len(last_block)))
        return out

    monkeypatch.setattr(LTX2Pipeline, "denoise", spy)
    try:
        cache = two_stage_pipe.enable_first_block_cache(1e9)["dit"]
        two_stage_pipe(CAPTIONS[1], seed=0, num_inference_steps=2, use_two_stage_pipeline=True, **SETTINGS)
    finally:
        hook.remove()
        two_stage_pipe.disable_first_block_cache()
    assert seen == [(2, 1, 1), (3, 2, 1)]


def test_distilled_model_runs_two_stages_without_lora_by_default(two_stage_pipe, monkeypatch):
    seen = []
    real = LTX2Pipeline.predict

    def spy(self, video, audio, sigma, text, *args, **kwargs):
        seen.append((tuple(video.shape[-2:]), bool(list_loras(self.dit))))
        return real(self, video, audio, sigma, text, *args, **kwargs)

    monkeypatch.setattr(LTX2Pipeline, "predict", spy)
    two_stage_pipe(CAPTIONS[1], seed=0, use_distilled_pipeline=True, **SETTINGS)
    assert len(seen) == 8 + 3 and not any(lora for _, lora in seen)
    assert {shape for shape, _ in seen[8:]} == {(2 * H // 32, 2 * W // 32)}


def test_two_stage_errors_name_what_is_missing(tiny_ltx2_pipe, two_stage_pipe):
    with pytest.raises(ConfigError, match="ltx-2-spatial-upscaler-x2-1.0.safetensors"):
        tiny_ltx2_pipe(CAPTIONS[0], use_two_stage_pipeline=True, **SETTINGS)
    with pytest.raises(ConfigError, match="ltx-2-spatial-upscaler-x2-1.0.safetensors"):
        tiny_ltx2_pipe(CAPTIONS[0], use_distilled_pipeline=True, **SETTINGS)
    with pytest.raises(ConfigError, match="multiples of 64"):
        two_stage_pipe(CAPTIONS[0], use_two_stage_pipeline=True, **{**SETTINGS, "height": 96})
    for pipe, extra in ((tiny_ltx2_pipe, {}), (two_stage_pipe, {"use_two_stage_pipeline": False})):
        with pytest.raises(ConfigError, match="stage2_lora_strength .*one stage: pass use_two_stage_pipeline=True"):
            pipe(CAPTIONS[0], stage2_lora_strength=0.3, **SETTINGS, **extra)
    with pytest.raises(ConfigError, match="stage2_lora_strength scales the distilled LoRA .* the distilled model"):
        two_stage_pipe(CAPTIONS[0], use_distilled_pipeline=True, stage2_lora_strength=0.3, **SETTINGS)
    lora = two_stage_pipe.stage2_lora
    try:
        two_stage_pipe.stage2_lora = None
        with pytest.raises(ConfigError, match="stage2_lora_config"):
            two_stage_pipe(CAPTIONS[0], use_two_stage_pipeline=True, **SETTINGS)
    finally:
        two_stage_pipe.stage2_lora = lora


def test_presets_name_the_authors_files():
    two = PRESETS["Lightricks/LTX-2:two-stage"]
    assert [f.origin_file_pattern for f in two.files][:2] == [
        "ltx-2-19b-dev.safetensors",
        "ltx-2-spatial-upscaler-x2-1.0.safetensors",
    ]
    assert two.defaults["stage2_lora"] == ("Lightricks/LTX-2", "ltx-2-19b-distilled-lora-384.safetensors")
    assert (two.defaults["height"], two.defaults["width"]) == (1024, 1536)  # stage 1 at the authors' 512 x 768
    distilled = PRESETS["Lightricks/LTX-2:distilled"]
    assert "ltx-2-spatial-upscaler-x2-1.0.safetensors" in [f.origin_file_pattern for f in distilled.files]
    assert "use_two_stage_pipeline" not in PRESETS["Lightricks/LTX-2"].defaults


# ----------------------------------------------------------------------------------------- LoRA files
def _layouts(pipe) -> dict[str, dict[str, torch.Tensor]]:
    """One LoRA (block targets, two top-level linears, the connectors' text projection) in the ltx-core /
    ComfyUI layout and in diffusers' names (`transformer.proj_in`, `transformer.time_embed.linear`, ...)."""
    from diffsynth.ltx2.dit_formats import TOP_LEVEL

    state = lora_state(pipe.dit, prefix="")
    generator = torch.Generator().manual_seed(5)
    for name in ("patchify_proj", "adaln_single.linear"):
        out_f, in_f = pipe.dit.get_submodule(name).weight.shape
        state[f"{name}.lora_A.weight"] = 0.1 * torch.randn(RANK, in_f, generator=generator)
        state[f"{name}.lora_B.weight"] = 0.1 * torch.randn(out_f, RANK, generator=generator)
    comfy = {f"diffusion_model.{k}": v for k, v in state.items()}
    renames = {k.removesuffix(".weight"): v.removesuffix(".weight") for k, v in TOP_LEVEL.items()}
    theirs = {}
    for key, value in state.items():
        module, _, kind = key.partition(".lora_")
        theirs[f"transformer.{renames.get(module, module)}.lora_{kind}"] = value
    out_f, in_f = pipe.connectors.text_embedding_projection.aggregate_embed.weight.shape
    projection = {
        "text_embedding_projection.aggregate_embed.lora_A.weight": torch.randn(RANK, in_f, generator=generator),
        "text_embedding_projection.aggregate_embed.lora_B.weight": torch.randn(out_f, RANK, generator=generator),
    }
    return {"comfyui": {**comfy, **projection}, "diffusers": theirs}


def test_lora_layouts_read_as_the_same_targets(tiny_ltx2_pipe, tmp_path):
    """Both layouts give the DiT the same targets (diffusers' top-level names renamed to ours); the text
    projection's target goes to the connectors, and `load_lora` attaches each part to its model."""
    paths = {}
    for layout, state in _layouts(tiny_ltx2_pipe).items():
        paths[layout] = tmp_path / f"lora-{layout}.safetensors"
        save_file(state, paths[layout])
    comfy, theirs = (tiny_ltx2_pipe.read_lora(paths[k]).targets for k in ("comfyui", "diffusers"))
    assert comfy.keys() == theirs.keys() and {"patchify_proj", "adaln_single.linear"} <= comfy.keys()
    assert all(torch.equal(comfy[k].down, theirs[k].down) and torch.equal(comfy[k].up, theirs[k].up) for k in comfy)
    connectors = tiny_ltx2_pipe.read_lora(paths["comfyui"], slot="connectors").targets
    assert list(connectors) == ["text_embedding_projection.aggregate_embed"]
    with pytest.raises(LoRAError, match="has no LoRA for the 'vae' model"):
        tiny_ltx2_pipe.read_lora(paths["comfyui"], slot="vae")

    from diffsynth.runtime.lora import clear_loras

    assert tiny_ltx2_pipe.load_lora(paths["comfyui"], fuse=False, name="check") == "check"
    try:
        assert "check" in list_loras(tiny_ltx2_pipe.dit) and "check" in list_loras(tiny_ltx2_pipe.connectors)
    finally:
        clear_loras(tiny_ltx2_pipe.dit, "check")
        clear_loras(tiny_ltx2_pipe.connectors, "check")


def test_image_to_video_conditions_both_stages_at_their_sizes(two_stage_pipe, monkeypatch):
    """The first frame is encoded at half size for stage 1 and again at full size for stage 2 (ltx-core's
    stage-2 conditionings); both stages keep it clean."""
    from PIL import Image

    sizes, masks = [], []
    real_condition, real_predict = LTX2Pipeline.first_frame_condition, LTX2Pipeline.predict

    def condition(self, video, images, height, width, *args):
        sizes.append((height, width, tuple(video.shape[-2:])))
        return real_condition(self, video, images, height, width, *args)

    def predict(self, *args, **kwargs):
        masks.append(kwargs.get("denoise_mask") is not None)
        return real_predict(self, *args, **kwargs)

    monkeypatch.setattr(LTX2Pipeline, "first_frame_condition", condition)
    monkeypatch.setattr(LTX2Pipeline, "predict", predict)
    image = Image.new("RGB", (2 * W, 2 * H), (200, 40, 90))
    two_stage_pipe(CAPTIONS[1], seed=0, input_image=image, use_distilled_pipeline=True, image_crf=0, **SETTINGS)
    h, w = H // 32, W // 32
    assert sizes == [(H, W, (h, w)), (2 * H, 2 * W, (2 * h, 2 * w))]
    assert masks == [True] * 11


def test_first_frame_strength_reaches_both_stages(two_stage_pipe, monkeypatch):
    """A first frame at strength 0.5: both stages get the mask 1 - 0.5 on that frame and the clean latents to
    blend towards, and the video differs from the one that keeps the frame exactly."""
    from PIL import Image

    seen = []
    real = LTX2Pipeline.denoise

    def denoise(self, video, audio, scheduler, text, fps, mask, *args):
        seen.append((float(mask[0, 0, 0].max()), float(mask[0, 0, 1:].min()), args[-1] is not None))
        return real(self, video, audio, scheduler, text, fps, mask, *args)

    monkeypatch.setattr(LTX2Pipeline, "denoise", denoise)
    image = Image.new("RGB", (2 * W, 2 * H), (200, 40, 90))
    common = dict(seed=0, input_image=image, use_distilled_pipeline=True, image_crf=0, output_type="pt", **SETTINGS)
    loose, _ = two_stage_pipe(CAPTIONS[1], input_images_strength=0.5, **common)
    assert seen == [(0.5, 1.0, True)] * 2
    kept, _ = two_stage_pipe(CAPTIONS[1], **common)
    assert (loose - kept).abs().max() > 1e-3


def test_vram_managed_two_stage_run_equals_the_resident_one(tiny_ltx2_base, two_stage_pipe, stage_two_files):
    """Every model under the VRAM manager, every unit streamed (the upsampler too), the stage-2 LoRA attached
    unfused to streamed layers: the same video and sound as the resident pipeline."""
    upsampler, lora = stage_two_files
    managed = repo_module.our_pipeline(
        tiny_ltx2_base, model_configs=[ModelConfig(path=str(upsampler))], stage2_lora_config=str(lora), vram_limit=0
    )
    assert "upsampler" in managed.vram_handles
    kwargs = dict(seed=2, num_inference_steps=2, output_type="pt", use_two_stage_pipeline=True, **SETTINGS)
    got, expected = managed(CAPTIONS[0], **kwargs), two_stage_pipe(CAPTIONS[0], **kwargs)
    torch.testing.assert_close(got[0], expected[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1].waveform, expected[1].waveform, atol=0, rtol=0)
    assert list_loras(managed.dit) == {}


def test_clear_lora_before_stage_two_turns_your_loras_off_there(tiny_ltx2_base, stage_two_files, monkeypatch):
    """`clear_lora_before_state_two` (DiffSynth-Studio's name, the authors' IC-LoRA recipe): a LoRA loaded apart
    acts in the first stage, is at scale 0 in the second (where the distilled LoRA acts) and is back afterwards;
    a fused LoRA cannot be taken out, which is refused before any work."""
    from diffsynth.ltx2.pipeline import STAGE_2_LORA_NAME

    upsampler, lora = stage_two_files
    pipe = repo_module.our_pipeline(
        tiny_ltx2_base, model_configs=[ModelConfig(path=str(upsampler))], stage2_lora_config=str(lora)
    )
    mine = repo_module.lora_state(pipe.dit, seed=5)
    path = tiny_ltx2_base / "ic-lora-stand-in.safetensors"
    save_file(mine, str(path))
    pipe.load_lora(str(path), scale=0.5, fuse=False, name="control")
    seen = []
    real = LTX2Pipeline.predict

    def spy(self, *args, **kwargs):
        seen.append(dict(list_loras(self.dit)))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LTX2Pipeline, "predict", spy)
    options = dict(seed=0, num_inference_steps=2, use_two_stage_pipeline=True, output_type="pt", **SETTINGS)
    cleared = pipe(CAPTIONS[1], clear_lora_before_state_two=True, **options)[0]
    assert seen[:2] == [{"control": 0.5}] * 2
    assert seen[2:] == [{"control": 0.0, STAGE_2_LORA_NAME: STRENGTH}] * 3
    assert list_loras(pipe.dit) == {"control": 0.5}
    kept = pipe(CAPTIONS[1], **options)[0]
    assert seen[-1] == {"control": 0.5, STAGE_2_LORA_NAME: STRENGTH} and (kept - cleared).abs().max() > 1e-4
    pipe.load_lora(str(path), scale=0.5)  # fused
    with pytest.raises(ConfigError, match="cannot take out LoRAs fused into the weights.*fuse=False"):
        pipe(CAPTIONS[1], clear_lora_before_state_two=True, **options)


def test_video_retake_keeps_the_given_frames_in_both_stages(two_stage_pipe, monkeypatch):
    """A retaken video is encoded at each stage's size; the final latents outside the regions are the given
    video's at full size."""
    import diffsynth.ltx2.pipeline as pipeline_module
    from diffsynth.runtime.media import pil_to_tensor

    frames = 17  # 3 latent frames; the region re-makes the last
    rng = np.random.default_rng(0)
    given = [
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((2 * W, 2 * H)) for _ in range(frames)
    ]
    sizes, decoded = [], []
    real_keep, real_decode = pipeline_module.keep_video, type(two_stage_pipe.vae).decode

    def keep(pipe, video, kept, height, width, regions, fps):
        sizes.append((height, width))
        return real_keep(pipe, video, kept, height, width, regions, fps)

    monkeypatch.setattr(pipeline_module, "keep_video", keep)
    monkeypatch.setattr(
        type(two_stage_pipe.vae), "decode", lambda self, z, **k: decoded.append(z) or real_decode(self, z, **k)
    )
    options = {**SETTINGS, "num_frames": frames}
    two_stage_pipe(
        CAPTIONS[1], seed=0, num_inference_steps=2, use_two_stage_pipeline=True, retake_video=given,
        retake_video_regions=[(0.4, 1.0)], output_type="pt", **options,
    )  # fmt: skip
    assert sizes == [(H, W), (2 * H, 2 * W)]
    pixels = pil_to_tensor(given, dtype=torch.float32, device=two_stage_pipe.device).transpose(0, 1)[None]
    encoded = two_stage_pipe.vae.encode(pixels)
    torch.testing.assert_close(decoded[-1][:, :, :2], encoded[:, :, :2], rtol=0, atol=1e-6)


def test_lora_presets_load_their_base_and_lora(tiny_ltx2_base, tiny_ltx2_pipe, tmp_path, monkeypatch):
    """A camera-control preset is LTX-2's two-stage preset with its LoRA fused: the DiT's weights equal the base's
    after `load_lora(file)`. An IC-LoRA preset keeps its LoRA apart (the second stage runs without it:
    `clear_lora_before_state_two` is on by default) at the same weights."""
    import shutil

    base = tmp_path / "models"
    shutil.copytree(tiny_ltx2_base, base)
    repo_module.write_two_stage_files(base / "Lightricks" / "LTX-2", tiny_ltx2_pipe.dit)
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    camera, ic = "Lightricks/LTX-2-19b-LoRA-Camera-Control-Dolly-In", "Lightricks/LTX-2-19b-IC-LoRA-Detailer"
    files = {}
    for seed, repo in ((21, camera), (22, ic)):
        files[repo] = base / repo / PRESETS[repo].loras[0].origin_file_pattern
        files[repo].parent.mkdir(parents=True)
        save_file(lora_state(tiny_ltx2_pipe.dit, seed=seed), str(files[repo]))

    fused = LTX2Pipeline.from_pretrained(camera, device="cpu", torch_dtype=torch.float32)
    assert list_loras(fused.dit) == {} and fused.defaults["use_two_stage_pipeline"] is True
    reference = repo_module.our_pipeline(tiny_ltx2_base)
    reference.load_lora(str(files[camera]))
    ours, theirs = fused.dit.state_dict(), reference.dit.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    plain = tiny_ltx2_pipe.dit.state_dict()
    assert sum(not torch.equal(ours[k], plain[k]) for k in plain) >= 4  # the LoRA's targets moved

    apart = LTX2Pipeline.from_pretrained(ic, device="cpu", torch_dtype=torch.float32)
    assert len(list_loras(apart.dit)) == 1 and apart.defaults["clear_lora_before_state_two"] is True
    reference = repo_module.our_pipeline(tiny_ltx2_base)
    reference.load_lora(str(files[ic]), fuse=False)
    ours, theirs = apart.dit.state_dict(), reference.dit.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)

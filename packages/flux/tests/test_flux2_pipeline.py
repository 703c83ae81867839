"""`Flux2ImagePipeline` on tiny random FLUX.2 repos: parity with diffusers' `Flux2KleinPipeline` (text-to-image,
multi-reference editing, the undistilled model's CFG) and `Flux2Pipeline` (FLUX.2-dev: Mistral prompts, embedded
guidance), and the pipeline's own rules (sizes, references, errors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffsynth_flux2_test_repo import (
    CAPTIONS,
    build_tiny_dev_repo,
    our_pipeline,
    reference_dev_pipeline,
    reference_pipeline,
)
from diffsynth_flux_test_helpers import check_pipeline_first_block_cache, max_abs, random_image
from PIL import Image

from diffsynth.runtime.errors import ConfigError

H = W = 64
STEPS = 3


def noise(batch: int, seed: int = 5, height: int = H, width: int = W) -> torch.Tensor:
    return torch.randn(batch, 16, height // 16, width // 16, generator=torch.Generator().manual_seed(seed))


def ours(pipe, prompt, latents, **kwargs) -> np.ndarray:
    kwargs = {"height": H, "width": W, "num_inference_steps": STEPS, "progress_bar": False, **kwargs}
    return pipe(prompt, latents=latents, output_type="np", **kwargs)


def reference(pipe, prompt, latents, **kwargs) -> np.ndarray:
    kwargs = {"height": H, "width": W, "num_inference_steps": STEPS, **kwargs}
    return pipe(prompt=prompt, latents=latents, output_type="np", **kwargs).images


@pytest.fixture(scope="module")
def diffusers_klein(tiny_klein_repo):
    pytest.importorskip("diffusers")
    return reference_pipeline(tiny_klein_repo, distilled=True)


@pytest.mark.parity
def test_text_to_image_matches_diffusers(tiny_klein_pipe, diffusers_klein, one_thread):
    prompts = CAPTIONS[:2]
    x = noise(2)
    got, want = ours(tiny_klein_pipe, prompts, x), reference(diffusers_klein, prompts, x)
    assert got.shape == want.shape == (2, H, W, 3)
    assert max_abs(got, want) < 2e-5


@pytest.mark.parity
def test_editing_with_two_references_matches_diffusers(tiny_klein_pipe, diffusers_klein, one_thread):
    """Reference tokens at t = 10 and 20, each at its own size (one needs the centred cut to multiples of 16)."""
    refs = [random_image(96, 64, seed=1), random_image(72, 88, seed=2)]
    x = noise(1, seed=7)
    got = ours(tiny_klein_pipe, CAPTIONS[3], x, edit_image=refs)
    want = reference(diffusers_klein, CAPTIONS[3], x, image=refs)
    assert max_abs(got, want) < 2e-5
    plain = ours(tiny_klein_pipe, CAPTIONS[3], x)
    assert max_abs(got, plain) > 1e-3  # the references change the picture


@pytest.mark.parity
def test_undistilled_model_cfg_matches_diffusers(tiny_klein_pipe, tiny_klein_repo, one_thread):
    pytest.importorskip("diffusers")
    base = reference_pipeline(tiny_klein_repo, distilled=False)
    x = noise(1, seed=9)
    got = ours(tiny_klein_pipe, CAPTIONS[0], x, cfg_scale=4.0)
    want = reference(base, CAPTIONS[0], x, guidance_scale=4.0)
    assert max_abs(got, want) < 2e-5
    assert max_abs(got, ours(tiny_klein_pipe, CAPTIONS[0], x)) > 1e-3


@pytest.fixture(scope="module")
def tiny_dev_repo(tmp_path_factory):
    return build_tiny_dev_repo(tmp_path_factory.mktemp("tiny-flux2-dev"))


@pytest.mark.parity
def test_dev_with_mistral_prompts_and_embedded_guidance_matches_diffusers(tiny_dev_repo, one_thread):
    pytest.importorskip("diffusers")
    pipe, reference_pipe = our_pipeline(tiny_dev_repo), reference_dev_pipeline(tiny_dev_repo)
    x = noise(1, seed=13)
    refs = [random_image(80, 64, seed=3)]
    got = ours(pipe, CAPTIONS[3], x, embedded_guidance=2.5, edit_image=refs, max_sequence_length=256)
    want = reference(reference_pipe, CAPTIONS[3], x, guidance_scale=2.5, image=refs, max_sequence_length=256)
    assert max_abs(got, want) < 2e-5
    other = ours(pipe, CAPTIONS[3], x, embedded_guidance=5.0, edit_image=refs, max_sequence_length=256)
    assert max_abs(got, other) > 1e-3  # the guidance embedding is used


def test_seeded_noise_is_reproducible_and_sized(tiny_klein_pipe, one_thread):
    a = tiny_klein_pipe(
        CAPTIONS[0], height=48, width=80, seed=3, num_inference_steps=2, output_type="pt", progress_bar=False
    )
    b = tiny_klein_pipe(
        CAPTIONS[0], height=48, width=80, seed=3, num_inference_steps=2, output_type="pt", progress_bar=False
    )
    c = tiny_klein_pipe(
        CAPTIONS[0], height=48, width=80, seed=4, num_inference_steps=2, output_type="pt", progress_bar=False
    )
    assert a.shape == (1, 3, 48, 80)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_initial_noise_is_diffsynth_studios_name_for_latents(tiny_klein_pipe, one_thread):
    x = noise(1, seed=9)
    kwargs = {"height": H, "width": W, "num_inference_steps": 2, "progress_bar": False, "output_type": "pt"}
    via_latents = tiny_klein_pipe(CAPTIONS[0], latents=x, **kwargs)
    assert torch.equal(tiny_klein_pipe(CAPTIONS[0], initial_noise=x, **kwargs), via_latents)
    assert not torch.equal(tiny_klein_pipe(CAPTIONS[0], seed=0, **kwargs), via_latents)
    with pytest.raises(ConfigError, match="not both"):
        tiny_klein_pipe(CAPTIONS[0], latents=x, initial_noise=x, **kwargs)


def test_image_to_image_keeps_the_input_at_low_strength(tiny_klein_pipe, one_thread):
    """At strength s the sampler starts from the encoded input noised to sigma_0 < 1: low strength stays closer."""
    image = random_image(W, H, seed=4)
    encoded = tiny_klein_pipe.vae_encode([image])
    roundtrip = tiny_klein_pipe.vae.decode(encoded).clamp(-1, 1).add(1).div(2).permute(0, 2, 3, 1).numpy()
    low = ours(tiny_klein_pipe, CAPTIONS[0], None, input_image=image, denoising_strength=0.2, seed=1)
    high = ours(tiny_klein_pipe, CAPTIONS[0], None, input_image=image, denoising_strength=1.0, seed=1)
    assert np.abs(low - roundtrip).mean() < np.abs(high - roundtrip).mean()


def test_output_takes_the_first_reference_size(tiny_klein_pipe, one_thread):
    refs = [random_image(100, 70, seed=1), random_image(64, 64, seed=2)]
    out = tiny_klein_pipe(
        CAPTIONS[3], edit_image=refs, seed=0, num_inference_steps=1, output_type="pt", progress_bar=False
    )
    assert out.shape[-2:] == (64, 96)  # 100x70 cut to multiples of 16


@pytest.mark.parametrize(
    ("size", "expected"),
    # DiffSynth-Studio's rule worked by hand: w = sqrt(2^20 * aspect), h = w / aspect, each rounded to 32s
    [((300, 200), (1248, 832)), ((333, 250), (1184, 896)), ((64, 64), (1024, 1024)), ((200, 400), (736, 1440))],
)
def test_edit_image_auto_resize_fits_about_a_megapixel(size, expected):
    from diffsynth.flux.flux2.pipeline import fit_to_area

    image = random_image(*size, seed=3)
    fitted = fit_to_area(image)
    assert fitted.size == expected
    # scaled to cover, then cut at the centre: the picture is the same one (its mean colour stays)
    mean = np.asarray(fitted, dtype=np.float32).mean()
    assert abs(mean - np.asarray(image, dtype=np.float32).mean()) < 10


def test_edit_image_auto_resize_chooses_the_reference_size(tiny_klein_pipe, monkeypatch):
    """None: scaled down past a megapixel only (diffusers' rule); True: to about a megapixel (DiffSynth-Studio's);
    False: as given. Each is then cut to multiples of 16."""
    seen = []

    class Stop(Exception):
        pass

    def spy(images, *args, **kwargs):
        seen.append([image.size for image in images])
        raise Stop

    monkeypatch.setattr(tiny_klein_pipe, "encode_references", spy)
    ref = random_image(100, 70, seed=1)
    for auto in (None, True, False):
        with pytest.raises(Stop):
            tiny_klein_pipe(CAPTIONS[3], edit_image=ref, edit_image_auto_resize=auto, num_inference_steps=1)
    assert seen == [[(96, 64)], [(1216, 864)], [(96, 64)]]
    with pytest.raises(ConfigError, match="edit_image_auto_resize='yes'"):
        tiny_klein_pipe(CAPTIONS[3], edit_image=ref, edit_image_auto_resize="yes")


@pytest.mark.parametrize(
    "extra",
    [{}, {"edit_image": "reference"}, {"cfg_scale": 4.0}],
    ids=["text-to-image", "reference-tokens", "cfg"],
)
def test_first_block_cache_in_the_pipeline(tiny_klein_pipe, one_thread, extra):
    """Reference tokens ride in the image stream; CFG runs both branches as one batch (one DiT call a step).
    diffusers' first-block cache fails on its FLUX.2 model, so there is no parity test of it."""
    extra = {k: random_image(64, 64, seed=3) if v == "reference" else v for k, v in extra.items()}
    x = noise(1, seed=6)
    check_pipeline_first_block_cache(
        tiny_klein_pipe, lambda: ours(tiny_klein_pipe, CAPTIONS[0], x, num_inference_steps=4, **extra), steps=4
    )


def test_large_references_are_scaled_to_a_megapixel(tiny_klein_pipe):
    (image,) = tiny_klein_pipe.load_edit_images(Image.new("RGB", (2048, 1024)))
    assert image.width * image.height <= 1024 * 1024
    assert image.width % 16 == 0 and image.height % 16 == 0
    assert abs(image.width / image.height - 2.0) < 0.05


@pytest.mark.parametrize(
    ("size", "message"), [((32, 128), r"edit_image\[0\] is 32x128.*at least 64"), ((640, 64), r"aspect ratio")]
)
def test_bad_references_are_named(tiny_klein_pipe, size, message):
    with pytest.raises(ConfigError, match=message):
        tiny_klein_pipe.load_edit_images([Image.new("RGB", size)])


def test_mismatched_text_encoder_is_refused(tiny_klein_pipe):
    """A klein-9B DiT with a klein-4B text encoder (context widths differ) is named, not a matmul error."""
    from diffsynth_flux2_test_repo import dit_config

    from diffsynth.flux.flux2.formats import FLUX2_DIT_SPEC

    wide = FLUX2_DIT_SPEC.build(FLUX2_DIT_SPEC.config_from_state({}, dit_config(guidance=False, context=64)))
    with tiny_klein_pipe.using("dit", wide), pytest.raises(ConfigError, match="48 features.*takes 64"):
        tiny_klein_pipe(CAPTIONS[0], height=H, width=W, num_inference_steps=1, progress_bar=False)


def test_missing_tokenizer_is_named(tiny_klein_pipe, monkeypatch):
    monkeypatch.setattr(tiny_klein_pipe, "tokenizer", None)
    with pytest.raises(ConfigError, match="tokenizer_config"):
        tiny_klein_pipe(CAPTIONS[0], height=H, width=W, num_inference_steps=1, progress_bar=False)


def test_klein_preset_loads_offline_and_cli_generates(tiny_klein_repo, tmp_path, monkeypatch):
    """`--model black-forest-labs/FLUX.2-klein-4B`: the preset's files found under the base path, its defaults
    (4 steps, no CFG) applied, and the FLUX.2 family picked for a plain folder too."""
    import shutil

    from diffsynth.runtime.cli import main
    from diffsynth.runtime.schedulers import FlowMatchScheduler

    base = tmp_path / "models"
    shutil.copytree(tiny_klein_repo, base / "black-forest-labs" / "FLUX.2-klein-4B")
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    steps = []
    original = FlowMatchScheduler.set_timesteps

    def spy(self, num_inference_steps, **kwargs):
        steps.append(num_inference_steps)
        return original(self, num_inference_steps, **kwargs)

    monkeypatch.setattr(FlowMatchScheduler, "set_timesteps", spy)
    fast = ["--height", "32", "--width", "48", "--device", "cpu", "--dtype", "float32", "--seed", "1"]
    for model, name in (("black-forest-labs/FLUX.2-klein-4B", "preset.png"), (str(tiny_klein_repo), "folder.png")):
        out = tmp_path / name
        assert main(["generate", "--model", model, "--prompt", CAPTIONS[0], "--output", str(out), *fast]) == 0
        with Image.open(out) as image:
            assert image.size == (48, 32)
    assert steps == [4, 50]  # the preset's 4 steps; a bare folder gets the pipeline's own default


def test_vram_managed_pipeline_gives_the_same_image(tiny_klein_repo, tiny_klein_pipe, one_thread):
    """Every model under the VRAM manager with every unit streamed, and an edit reference: the same output."""
    managed = our_pipeline(tiny_klein_repo, vram_limit=0)
    assert sorted(managed.vram_handles) == ["dit", "text_encoder", "vae"]
    kwargs = dict(seed=0, output_type="pt", height=H, width=W, num_inference_steps=2, progress_bar=False)
    refs = [random_image(64, 80, seed=6)]
    torch.testing.assert_close(
        managed(CAPTIONS[3], edit_image=refs, **kwargs),
        tiny_klein_pipe(CAPTIONS[3], edit_image=refs, **kwargs),
        atol=0,
        rtol=0,
    )

"""InfiniteYou (`flux1/infiniteyou.py`): the id projector against the authors' `Resampler` (read from their git mirror;
skipped where it is absent), its released layout and strict loading of their `.bin`, and what the pipeline hands
InfuseNet (the ControlNet): the projected id tokens as its text, at text position 0, its own guidance, a black
control image by default; the DiT keeps the prompt. Errors name the argument."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest
import torch
from diffsynth_flux_test_helpers import make_controlnet, our_pipeline, repo_controlnet_config
from PIL import Image

from diffsynth.flux.flux1.infiniteyou import (
    InfiniteYouProjector,
    InfiniteYouProjectorConfig,
    check_embedding,
    config_from_state,
    face_embedding,
    largest_face,
    load_projector,
)
from diffsynth.flux.pipeline import pack_latents
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.testing.weights import random_weights

pytestmark = pytest.mark.usefixtures("one_thread")
MIRROR = Path("/work/.mirror/bytedance+InfiniteYou/repo")
TINY = dict(dim=32, depth=2, dim_head=64, heads=2, num_queries=8, embedding_dim=512, output_dim=48, ff_mult=4)


def authors_resampler():
    """The authors' `Resampler` class, compiled from `pipelines/resampler.py` of their mirror."""
    if not (MIRROR / "HEAD").exists() and not (MIRROR / ".git").exists():
        pytest.skip("the InfiniteYou git mirror is not on this machine")
    source = subprocess.run(
        ["git", "-C", str(MIRROR), "show", "HEAD:pipelines/resampler.py"], capture_output=True, text=True
    )
    if source.returncode:
        pytest.skip("pipelines/resampler.py is not in the InfiniteYou mirror")
    namespace: dict = {}
    exec(compile(ast.parse(source.stdout), "resampler.py", "exec"), namespace)  # noqa: S102 (their module, in a test)
    return namespace["Resampler"]


def test_projector_matches_the_authors_resampler():
    cfg = InfiniteYouProjectorConfig(**TINY)
    ours = random_weights(InfiniteYouProjector(cfg), 0, scale=0.2).eval()
    theirs = authors_resampler()(**TINY).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)  # the same names
    x = torch.randn(2, 1, 512, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_released_projector_layout_on_meta():
    """The authors' sizes (dim 1280, 4 layers of 20 heads, 8 queries, 512 -> 4096): every key and shape equal to
    their `Resampler`'s (mirror), and the sizes read back from the shapes alone."""
    with torch.device("meta"):
        ours = InfiniteYouProjector()
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes["latents"] == (1, 8, 1280) and shapes["proj_out.weight"] == (4096, 1280)
    assert shapes["layers.3.0.to_kv.weight"] == (2560, 1280) and shapes["layers.3.1.3.weight"] == (1280, 5120)
    assert config_from_state(ours.state_dict()) == InfiniteYouProjectorConfig()
    if MIRROR.exists():
        with torch.device("meta"):
            theirs = authors_resampler()(1280, 4, 64, 20, 8, 512, 4096, 4)
        assert shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


def test_the_authors_bin_loads_strictly(tmp_path):
    model = random_weights(InfiniteYouProjector(InfiniteYouProjectorConfig(**TINY)), 2, scale=0.2)
    torch.save({"image_proj": model.state_dict()}, tmp_path / "image_proj_model.bin")
    loaded = load_projector(str(tmp_path / "image_proj_model.bin"))
    assert loaded.config == model.config
    ours, theirs = loaded.state_dict(), model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    broken = dict(model.state_dict())
    broken["extra.weight"] = torch.zeros(1)
    torch.save({"image_proj": broken}, tmp_path / "broken.bin")
    with pytest.raises(ConfigError, match="unexpected keys \\['extra.weight'\\]"):
        load_projector(str(tmp_path / "broken.bin"))
    torch.save({"other": torch.zeros(1)}, tmp_path / "other.bin")
    with pytest.raises(ConfigError, match="not an InfiniteYou image projector"):
        load_projector(str(tmp_path / "other.bin"))


def test_embedding_and_face_checks():
    assert check_embedding(torch.ones(512), 512).shape == (1, 1, 512)
    with pytest.raises(ConfigError, match="must be a \\[512\\] ArcFace embedding"):
        check_embedding(torch.ones(128), 512)
    with pytest.raises(ConfigError, match="NaN"):
        check_embedding(torch.full((512,), float("nan")), 512)
    faces = [{"bbox": (0, 0, 10, 10)}, {"bbox": (5, 5, 40, 30)}, {"bbox": (0, 0, 20, 20)}]
    assert largest_face(faces) is faces[1]
    with pytest.raises(ConfigError, match="no face was found"):
        largest_face([])
    try:
        import insightface  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install insightface"):
            face_embedding(Image.new("RGB", (8, 8)), "models")


# ------------------------------------------------------------------ the pipeline
@pytest.fixture(scope="module")
def iy_pipe(tiny_repo, tiny_configs, tmp_path_factory):
    from diffsynth_flux_test_helpers import write_controlnet_folder

    dit = tiny_configs["dit"]
    root = tmp_path_factory.mktemp("infiniteyou")
    net = write_controlnet_folder(root / "InfuseNetModel", make_controlnet(repo_controlnet_config(dit)), None)
    projector = InfiniteYouProjector(InfiniteYouProjectorConfig(**{**TINY, "output_dim": dit["joint_attention_dim"]}))
    torch.save({"image_proj": random_weights(projector, 3, scale=0.2).state_dict()}, root / "image_proj_model.bin")
    pipe = our_pipeline(tiny_repo, controlnet=[str(net)])
    pipe.load_infiniteyou(str(root / "image_proj_model.bin"))
    return pipe


def _calls(module):
    seen = []
    hook = module.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    return seen, hook


def test_infusenet_reads_the_id_tokens_and_its_own_guidance(iy_pipe):
    pipe = iy_pipe
    embedding = torch.randn(512, generator=torch.Generator().manual_seed(4))
    (net,) = pipe.controlnets()
    net_calls, h1 = _calls(net)
    dit_calls, h2 = _calls(pipe.dit)
    try:
        run = dict(num_inference_steps=2, height=32, width=32, seed=0, t5_sequence_length=16, progress_bar=False)
        pipe("a portrait", infinityou_id_embedding=embedding, infinityou_guidance=1.5, embedded_guidance=3.5, **run)
    finally:
        h1.remove()
        h2.remove()
    args, kwargs = net_calls[0]
    with torch.no_grad():
        tokens = pipe.infiniteyou_projector(embedding.reshape(1, 1, 512))
    torch.testing.assert_close(args[2], tokens)  # text: the id tokens
    assert torch.equal(args[3], torch.zeros(8, 3))  # at text position 0
    assert torch.equal(args[6], torch.full((1,), 1.5))  # InfuseNet's guidance
    black = pack_latents(pipe.vae_encode([Image.new("RGB", (32, 32))]))
    torch.testing.assert_close(kwargs["cond"], black)  # the default control image: black
    dit_args, dit_kwargs = dit_calls[0]
    assert dit_args[2].shape[1] == 16 and torch.equal(dit_args[6], torch.full((1,), 3.5))  # the DiT: the prompt
    assert dit_kwargs["controlnet_block_samples"] is not None


def test_infiniteyou_errors_name_the_argument(iy_pipe, tiny_pipe):
    run = dict(num_inference_steps=1, height=32, width=32, progress_bar=False)
    with pytest.raises(ConfigError, match="not both"):
        iy_pipe("a", infinityou_id_embedding=torch.ones(512), infinityou_id_image=Image.new("RGB", (8, 8)), **run)
    with pytest.raises(ConfigError, match="infinityou_guidance"):
        iy_pipe("a", infinityou_id_embedding=torch.ones(512), infinityou_guidance="high", **run)
    with pytest.raises(ConfigError, match="load_infiniteyou"):
        tiny_pipe("a", infinityou_id_embedding=torch.ones(512), **run)
    try:
        import insightface  # noqa: F401
    except ImportError:  # the face path says what to install before fetching anything
        with pytest.raises(ConfigError, match="pip install insightface"):
            iy_pipe("a", infinityou_id_image=Image.new("RGB", (8, 8)), **run)


@pytest.mark.parametrize("variant, stage", [("", "aes_stage2"), (":sim", "sim_stage1")])
def test_preset_loads_flux1_dev_infusenet_and_the_projector(
    bfl_repo_base, tiny_configs, tmp_path, monkeypatch, variant, stage
):
    """`ByteDance/InfiniteYou` (and `:sim`): FLUX.1-dev's files, the stage's InfuseNet folder (a ControlNet) and its
    `image_proj_model.bin` (the projector), found in the hub layout, with the authors' settings."""
    import shutil

    from diffsynth_flux_test_helpers import write_controlnet_folder

    from diffsynth.flux import FluxImagePipeline

    base = tmp_path / "models"
    shutil.copytree(bfl_repo_base, base)
    folder = base / "ByteDance" / "InfiniteYou" / "infu_flux_v1.0" / stage
    dit = tiny_configs["dit"]
    write_controlnet_folder(folder / "InfuseNetModel", make_controlnet(repo_controlnet_config(dit)), None)
    projector = InfiniteYouProjector(InfiniteYouProjectorConfig(**{**TINY, "output_dim": dit["joint_attention_dim"]}))
    torch.save({"image_proj": projector.state_dict()}, folder / "image_proj_model.bin")
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    pipe = FluxImagePipeline.from_pretrained(f"ByteDance/InfiniteYou{variant}", torch_dtype="float32", device="cpu")
    assert len(pipe.controlnets()) == 1 and pipe.infiniteyou_projector is not None
    assert (pipe.defaults["height"], pipe.defaults["width"], pipe.defaults["num_inference_steps"]) == (1152, 864, 30)
    image = pipe("a portrait", infinityou_id_embedding=torch.ones(512), height=32, width=32, num_inference_steps=1)
    assert image.size == (32, 32)

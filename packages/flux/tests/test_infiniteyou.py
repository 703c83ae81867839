"""InfiniteYou (`flux1/infiniteyou.py`, `FluxImagePipeline(infiniteyou_*)`).

- the id projector against the authors' `Resampler` (read from their git mirror; skipped where it is absent), its
  released layout on the meta device and strict loading of their `.bin`;
- InfuseNet (a diffusers FLUX ControlNet of 4 double + 10 single blocks): its full-size keys and shapes;
- what the pipeline hands InfuseNet (the projected id tokens as its text at text position 0, its own guidance, a
  black control image by default; the DiT keeps the prompt), and (parity) two denoising steps against the same
  steps written out with diffusers' `FluxControlNetModel` + `FluxTransformer2DModel`, as the authors' pipeline
  calls them, with and without true CFG;
- the face path on stub detectors shaped like insightface's (the largest face, the smaller detector inputs after a
  miss, the crop's pixels), and the errors (bad embedding, no face, missing extra) naming the argument.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffsynth_flux_test_helpers import (
    controlnet_config_json,
    make_controlnet,
    max_abs,
    our_pipeline,
    repo_controlnet_config,
    write_controlnet_folder,
)
from PIL import Image

from diffsynth.flux.flux1.controlnet import Flux1ControlNet
from diffsynth.flux.flux1.controlnet_formats import config_from_state as controlnet_config_from_state
from diffsynth.flux.flux1.controlnet_formats import ours_to_diffusers
from diffsynth.flux.flux1.infiniteyou import (
    FaceEncoder,
    InfiniteYouProjector,
    InfiniteYouProjectorConfig,
    check_embedding,
    config_from_state,
    face_libraries,
    largest_face,
    load_projector,
)
from diffsynth.flux.pipeline import pack_latents
from diffsynth.runtime.errors import CheckpointError, ConfigError
from diffsynth.runtime.testing.weights import random_weights

pytestmark = pytest.mark.usefixtures("one_thread")
MIRROR = Path("/work/.mirror/bytedance+InfiniteYou/repo")
TINY = dict(dim=32, depth=2, dim_head=64, heads=2, num_queries=8, embedding_dim=512, output_dim=48, ff_mult=4)
# `infu_flux_v1.0/*/InfuseNetModel/config.json`: a FluxControlNetModel of FLUX.1-dev's widths, 4 + 10 blocks
INFUSENET_JSON = {
    "_class_name": "FluxControlNetModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "conditioning_embedding_channels": None,
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 4,
    "num_mode": None,
    "num_single_layers": 10,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}


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


# ------------------------------------------------------------------ the projector and InfuseNet
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
    assert len(shapes) == 7 + 4 * (7 + 4) and shapes["proj_in.weight"] == (1280, 512)
    assert shapes["latents"] == (1, 8, 1280) and shapes["proj_out.weight"] == (4096, 1280)
    assert shapes["layers.3.0.to_kv.weight"] == (2560, 1280) and shapes["layers.3.1.3.weight"] == (1280, 5120)
    assert config_from_state(ours.state_dict()) == InfiniteYouProjectorConfig()
    if MIRROR.exists():
        with torch.device("meta"):
            theirs = authors_resampler()(1280, 4, 64, 20, 8, 512, 4096, 4)
        assert shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


def test_infusenet_layout_on_meta():
    """InfuseNet's config.json reads as a 4 + 10 block, guided, non-union net of FLUX.1-dev's widths whose
    diffusers-named keys are the released ones (per-block heads, no mode embedder), reading back the same config
    from its shapes; with diffusers there, exactly `FluxControlNetModel`'s keys and shapes."""
    cfg = controlnet_config_from_state({}, INFUSENET_JSON)
    assert (cfg.depth, cfg.depth_single_blocks, cfg.num_modes, cfg.guidance_embed) == (4, 10, None, True)
    assert (cfg.hidden_size, cfg.context_in_dim, cfg.vec_in_dim) == (3072, InfiniteYouProjectorConfig().output_dim, 768)
    with torch.device("meta"):
        net = Flux1ControlNet(cfg)
    assert controlnet_config_from_state(net.state_dict(), INFUSENET_JSON) == cfg
    shapes = {k: tuple(v.shape) for k, v in ours_to_diffusers(net.state_dict()).items()}
    assert shapes["controlnet_blocks.3.weight"] == (3072, 3072) and "controlnet_blocks.4.weight" not in shapes
    assert shapes["controlnet_single_blocks.9.weight"] == (3072, 3072)
    assert "controlnet_single_blocks.10.weight" not in shapes and "controlnet_mode_embedder.weight" not in shapes
    assert shapes["context_embedder.weight"] == (3072, 4096)
    assert shapes["time_text_embed.guidance_embedder.linear_1.weight"] == (3072, 256)
    assert shapes["controlnet_x_embedder.weight"] == (3072, 64)
    try:
        from diffusers import FluxControlNetModel
    except ImportError:
        return
    with torch.device("meta"):
        reference = FluxControlNetModel.from_config(INFUSENET_JSON)
    assert shapes == {k: tuple(v.shape) for k, v in reference.state_dict().items()}


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
    (tmp_path / "garbage.bin").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="garbage.bin: not a readable InfiniteYou image projector"):
        load_projector(str(tmp_path / "garbage.bin"))


def test_embedding_checks():
    assert check_embedding(torch.ones(512), 512).shape == (1, 1, 512)
    assert check_embedding(torch.ones(1, 2, 512, dtype=torch.float16), 512).dtype == torch.float32
    for bad in (torch.ones(128), torch.ones(512, 4), torch.ones(1, 1, 1, 512), [0.0] * 512):
        with pytest.raises(ConfigError, match="infiniteyou_id_embedding must be a \\[512\\] ArcFace embedding"):
            check_embedding(bad, 512)
    with pytest.raises(ConfigError, match="one identity"):
        check_embedding(torch.ones(2, 1, 512), 512)
    with pytest.raises(ConfigError, match="NaN"):
        check_embedding(torch.full((512,), float("nan")), 512)


# ------------------------------------------------------------------ the face path, on stubs
class StubDetector:
    """insightface's `FaceAnalysis.get(bgr)` in shape: a list of faces with `bbox` (x0, y0, x1, y1) and 5 `kps`."""

    def __init__(self, faces):
        self.faces, self.seen = faces, []

    def get(self, bgr):
        self.seen.append(bgr.copy())
        return list(self.faces)


def _face(x0, y0, x1, y1):
    return {"bbox": np.array([x0, y0, x1, y1], dtype=np.float32), "kps": np.full((5, 2), x0 + 0.5, np.float32)}


class StubAlign:
    """`norm_crop(bgr, landmark, image_size)`: a 112 x 112 crop (here the top-left corner of the image)."""

    def __init__(self):
        self.calls = []

    def __call__(self, bgr, landmark, image_size):
        self.calls.append((landmark, image_size))
        return bgr[:image_size, :image_size]


class StubArcFace(torch.nn.Module):
    """facexlib's ArcFace in shape: `[B, 3, 112, 112]` in [-1, 1] -> `[B, 512]`; a fixed random projection."""

    def __init__(self):
        super().__init__()
        self.weight = torch.randn(3 * 112 * 112, 512, generator=torch.Generator().manual_seed(6)) / 100
        self.seen = []

    def forward(self, pixels):
        self.seen.append(pixels)
        return pixels.flatten(1) @ self.weight


def _photo(seed=0, size=(120, 130)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_face_encoder_takes_the_largest_face_after_a_miss():
    """The 640 detector finds nothing, the 320 one three faces: the largest box's landmarks are aligned (112 px),
    the crop's BGR pixels in [-1, 1] go to ArcFace, and its first row is the embedding; the 160 one is not run."""
    faces = [_face(0, 0, 10, 10), _face(5, 5, 45, 30), _face(0, 0, 20, 20)]
    detectors = [StubDetector([]), StubDetector(faces), StubDetector([_face(0, 0, 99, 99)])]
    align, arcface = StubAlign(), StubArcFace()
    photo = _photo()
    embedding = FaceEncoder(detectors, arcface, align)(photo)
    rgb = np.asarray(photo)
    assert len(detectors[0].seen) == len(detectors[1].seen) == 1 and not detectors[2].seen
    assert np.array_equal(detectors[1].seen[0], rgb[:, :, ::-1])  # BGR, as cv2 reads
    ((landmark, size),) = align.calls
    assert size == 112 and np.array_equal(landmark, faces[1]["kps"])
    (pixels,) = arcface.seen
    want = torch.from_numpy(rgb[:112, :112, ::-1].copy()).permute(2, 0, 1)[None].float() / 255 * 2 - 1
    assert torch.equal(pixels, want)
    assert embedding.shape == (512,) and torch.equal(embedding, (want.flatten(1) @ arcface.weight)[0])
    assert largest_face(faces) is faces[1]
    ties = [_face(0, 0, 10, 10), _face(3, 3, 13, 13)]
    assert largest_face(ties) is ties[1]  # the authors' `sorted(...)[-1]`


def test_no_face_and_missing_extra_errors(monkeypatch):
    with pytest.raises(ConfigError, match="no face was found in infiniteyou_id_image"):
        FaceEncoder([StubDetector([])] * 3, StubArcFace(), StubAlign())(_photo())
    for module in ("insightface", "insightface.app", "facexlib", "facexlib.recognition"):
        monkeypatch.setitem(sys.modules, module, None)  # an import of it fails, installed or not
    with pytest.raises(ConfigError, match=r'pip install "diffsynth-flux\[infiniteyou\]"'):
        face_libraries()
    with pytest.raises(ConfigError, match="infiniteyou_id_embedding"):
        FaceEncoder.from_insightface("models")


def test_from_insightface_builds_the_authors_three_detectors(monkeypatch, tmp_path):
    """`from_insightface` (libraries stubbed): antelopev2 from `<root>/models/` prepared at 640, 320 and 160 px
    (detection only: its 5 landmarks are what the authors use), facexlib's ArcFace, insightface's `norm_crop`;
    the root as a str, a Path or a `ModelConfig` of the folder."""
    from diffsynth.flux.flux1 import infiniteyou
    from diffsynth.runtime.hub import ModelConfig

    made, arcface = [], StubArcFace()

    class StubAnalysis:
        def __init__(self, name, root, providers, allowed_modules):
            self.args = dict(name=name, root=root, providers=providers, allowed_modules=allowed_modules)
            made.append(self)

        def prepare(self, ctx_id, det_size):
            self.det_size = det_size

    class StubFaceAlign:
        norm_crop = StubAlign()

    def init_recognition_model(name, device):
        assert (name, device) == ("arcface", "cpu")
        return arcface

    monkeypatch.setattr(infiniteyou, "face_libraries", lambda: (StubAnalysis, StubFaceAlign, init_recognition_model))
    want = dict(
        name="antelopev2", root=str(tmp_path), providers=["CPUExecutionProvider"], allowed_modules=["detection"]
    )
    for root in (str(tmp_path), tmp_path, ModelConfig(path=str(tmp_path))):
        made.clear()
        encoder = FaceEncoder.from_insightface(root)
        assert [m.det_size for m in made] == [(640, 640), (320, 320), (160, 160)]
        assert all(m.args == want for m in made)
        assert encoder.detectors == made and encoder.arcface is arcface and encoder.align is StubFaceAlign.norm_crop


# ------------------------------------------------------------------ the pipeline
@pytest.fixture(scope="module")
def infusenet(tiny_configs, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny InfuseNet folder (diffusers layout, config.json) and id projector `.bin` of the tiny DiT's widths."""
    dit = tiny_configs["dit"]
    root = tmp_path_factory.mktemp("infiniteyou")
    cfg = repo_controlnet_config(dit, depth=1, depth_single_blocks=2)
    net = write_controlnet_folder(root / "InfuseNetModel", make_controlnet(cfg, seed=7), controlnet_config_json(cfg))
    projector = InfiniteYouProjector(InfiniteYouProjectorConfig(**{**TINY, "output_dim": dit["joint_attention_dim"]}))
    torch.save({"image_proj": random_weights(projector, 3, scale=0.2).state_dict()}, root / "image_proj_model.bin")
    return net, root / "image_proj_model.bin"


@pytest.fixture(scope="module")
def iy_pipe(tiny_repo, infusenet):
    net, projector = infusenet
    pipe = our_pipeline(tiny_repo, controlnet=[str(net)])
    pipe.load_infiniteyou(str(projector))
    return pipe


def _calls(module):
    seen = []
    hook = module.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    return seen, hook


RUN = dict(num_inference_steps=2, height=32, width=32, seed=0, t5_sequence_length=16, progress_bar=False)


def test_infusenet_reads_the_id_tokens_and_its_own_guidance(iy_pipe):
    pipe = iy_pipe
    embedding = torch.randn(512, generator=torch.Generator().manual_seed(4))
    (net,) = pipe.controlnets()
    net_calls, h1 = _calls(net)
    dit_calls, h2 = _calls(pipe.dit)
    try:
        pipe("a portrait", infiniteyou_id_embedding=embedding, infiniteyou_guidance=1.5, embedded_guidance=3.5, **RUN)
    finally:
        h1.remove()
        h2.remove()
    assert len(net_calls) == len(dit_calls) == 2
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


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_other_controlnets_keep_the_prompt_and_both_branches(tiny_repo, tiny_configs, infusenet, tmp_path, cfg_scale):
    """A Union net loaded before InfuseNet (recognised by its `InfuseNetModel` folder): only InfuseNet reads the id
    tokens at `infiniteyou_guidance` (positive branch only); the Union net reads the prompt at the DiT's guidance on
    both CFG branches, as when it is the only ControlNet; InfuseNet without an input of its own gets the black one."""
    from diffsynth.flux.pipeline import ControlNetInput

    net_folder, projector = infusenet
    union_cfg = repo_controlnet_config(tiny_configs["dit"], num_modes=4)
    union_folder = write_controlnet_folder(tmp_path / "union", make_controlnet(union_cfg, seed=2), None)
    pipe = our_pipeline(tiny_repo, controlnet=[str(union_folder), str(net_folder)])
    pipe.load_infiniteyou(str(projector))
    assert pipe.infusenet_id() == 1
    union, net = pipe.controlnets()
    embedding = torch.randn(512, generator=torch.Generator().manual_seed(4))
    run = dict(RUN, embedded_guidance=3.5, cfg_scale=cfg_scale, negative_prompt="blurry")
    control = [ControlNetInput(image=_photo(7), processor_id="depth", controlnet_id=0)]
    union_calls, h1 = _calls(union)
    net_calls, h2 = _calls(net)
    try:
        pipe(
            "a portrait", infiniteyou_id_embedding=embedding, infiniteyou_guidance=1.5, controlnet_inputs=control, **run
        )
    finally:
        h1.remove()
        h2.remove()
    with torch.no_grad():
        tokens = pipe.infiniteyou_projector(embedding.reshape(1, 1, 512))
    branches = 2 if cfg_scale != 1 else 1
    assert len(net_calls) == 2  # two steps, the positive branch only
    for args, _ in net_calls:
        torch.testing.assert_close(args[2], tokens)
        assert torch.equal(args[6], torch.full((1,), 1.5))
    torch.testing.assert_close(net_calls[0][1]["cond"], pack_latents(pipe.vae_encode([Image.new("RGB", (32, 32))])))
    assert len(union_calls) == 2 * branches  # both branches (apart: InfuseNet steers the positive one), every step
    alone = our_pipeline(tiny_repo, controlnet=[str(union_folder)])
    alone_calls, h3 = _calls(alone.controlnets()[0])
    try:
        alone("a portrait", controlnet_inputs=control, **run)
    finally:
        h3.remove()
    assert len(alone_calls) == 2  # one call a step (with CFG both branches batched)

    def joined(calls, index):  # the calls' argument `index`, batch rows in order (positive, negative per step)
        return torch.cat([args[index].reshape(args[0].shape[0], -1) for args, _ in calls])

    for index in (2, 5, 6):  # the prompt's T5 states (not the 8 id tokens), pooled CLIP, the DiT's guidance 3.5
        torch.testing.assert_close(joined(union_calls, index), joined(alone_calls, index), atol=0, rtol=0)
    assert union_calls[0][0][2].shape[1] == 16 and (joined(union_calls, 6) == 3.5).all()
    for index in (0, 4):  # the first step's image tokens and noise level: the same inputs as alone
        torch.testing.assert_close(joined(union_calls[:branches], index), joined(alone_calls[:1], index))
    for (_, kwargs), (_, want) in zip(union_calls[::branches], alone_calls, strict=True):
        torch.testing.assert_close(kwargs["cond"], want["cond"], atol=0, rtol=0)
        assert kwargs["mode"] == want["mode"] and kwargs["scale"] == want["scale"]


def test_a_photo_goes_through_the_face_encoder(iy_pipe):
    """`infiniteyou_id_image` (and DiffSynth-Studio's `infinityou_id_image`) give the image that the embedding
    the face encoder makes of it gives; a photo without a face is an error naming the argument."""
    pipe, arcface = iy_pipe, StubArcFace()
    pipe.infiniteyou_face_encoder = FaceEncoder([StubDetector([_face(0, 0, 30, 30)])], arcface, StubAlign())
    try:
        photo = _photo(1)
        embedding = pipe.infiniteyou_face_encoder(photo)
        want = pipe("a portrait", infiniteyou_id_embedding=embedding, output_type="np", **RUN)
        got = pipe("a portrait", infiniteyou_id_image=photo, output_type="np", **RUN)
        studio = pipe("a portrait", infinityou_id_image=photo, infinityou_guidance=1.0, output_type="np", **RUN)
        plain = pipe("a portrait", output_type="np", **RUN)
        assert max_abs(got, want) == 0 and max_abs(studio, want) == 0 and max_abs(got, plain) > 1e-4
        pipe.infiniteyou_face_encoder.detectors = [StubDetector([])]
        with pytest.raises(ConfigError, match="no face was found in infiniteyou_id_image"):
            pipe("a portrait", infiniteyou_id_image=photo, **RUN)
    finally:
        pipe.infiniteyou_face_encoder = None


def test_infiniteyou_errors_name_the_argument(iy_pipe, tiny_pipe, monkeypatch):
    run = dict(num_inference_steps=1, height=32, width=32, progress_bar=False)
    one = torch.ones(512)
    with pytest.raises(ConfigError, match="not both"):
        iy_pipe("a", infiniteyou_id_embedding=one, infiniteyou_id_image=Image.new("RGB", (8, 8)), **run)
    with pytest.raises(ConfigError, match="infinityou_guidance, not both"):
        iy_pipe("a", infiniteyou_id_embedding=one, infiniteyou_guidance=1.0, infinityou_guidance=1.0, **run)
    with pytest.raises(ConfigError, match="infiniteyou_guidance='high'"):
        iy_pipe("a", infiniteyou_id_embedding=one, infiniteyou_guidance="high", **run)
    with pytest.raises(ConfigError, match="infiniteyou_id_embedding must be a \\[512\\]"):
        iy_pipe("a", infiniteyou_id_embedding=torch.ones(256), **run)
    with pytest.raises(ConfigError, match="load_infiniteyou"):
        tiny_pipe("a", infiniteyou_id_embedding=one, **run)
    loaded = iy_pipe.infiniteyou_projector
    iy_pipe.infiniteyou_projector = InfiniteYouProjector(InfiniteYouProjectorConfig(**TINY))  # 48-wide tokens
    try:
        with pytest.raises(ConfigError, match="48-wide id tokens but a loaded ControlNet reads 32-wide text"):
            iy_pipe("a", infiniteyou_id_embedding=one, **run)
    finally:
        iy_pipe.infiniteyou_projector = loaded
    monkeypatch.setitem(sys.modules, "insightface", None)
    # the face path says what to install before fetching anything (no detector folder is on this machine)
    with pytest.raises(ConfigError, match=r"diffsynth-flux\[infiniteyou\]"):
        iy_pipe("a", infiniteyou_id_image=Image.new("RGB", (8, 8)), **run)


def test_cli_flag():
    from diffsynth.runtime.cli import build_parser

    for flag in ("--infiniteyou-id-image", "--infinityou-id-image"):
        args = build_parser().parse_args(["generate", "--prompt", "a man", flag, "face.jpg"])
        assert args.infiniteyou_id_image == "face.jpg"


@pytest.mark.parametrize("variant, stage", [("", "aes_stage2"), (":sim", "sim_stage1")])
def test_preset_loads_flux1_dev_infusenet_and_the_projector(
    bfl_repo_base, tiny_configs, tmp_path, monkeypatch, variant, stage
):
    """`ByteDance/InfiniteYou` (and `:sim`): FLUX.1-dev's files, the stage's InfuseNet folder (a ControlNet) and its
    `image_proj_model.bin` (the projector), found in the hub layout, with the authors' settings."""
    import shutil

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
    image = pipe("a portrait", infiniteyou_id_embedding=torch.ones(512), height=32, width=32, num_inference_steps=1)
    assert image.size == (32, 32)


# ------------------------------------------------------------------ parity with diffusers
@pytest.mark.parity
@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_denoising_steps_match_the_authors_calls_in_diffusers(iy_pipe, infusenet, tiny_repo, monkeypatch, cfg_scale):
    """Two steps of our pipeline with an id embedding equal the authors' `FluxInfuseNetPipeline` loop written out
    with diffusers' models on the same weights and noise: InfuseNet gets the projected id tokens (text ids 0), the
    prompt's pooled vector, its own guidance (1.5) and the black control image's VAE mean; the DiT gets the prompt,
    guidance 3.5 and the residuals; with true CFG the negative branch runs without residuals."""
    pytest.importorskip("diffusers")
    from diffsynth_flux_test_helpers import latent_noise, reference_components
    from diffusers import FluxControlNetModel, FluxControlNetPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    height, width, steps, text_len = 32, 48, 2, 16
    prompt, negative = "a portrait of a man", "blurry"
    embedding = torch.randn(512, generator=torch.Generator().manual_seed(9))
    noise = latent_noise(1, height, width, seed=5)

    finals = []
    original = iy_pipe.vae.decode
    monkeypatch.setattr(iy_pipe.vae, "decode", lambda x, **kw: (finals.append(x.clone()), original(x, **kw))[1])
    iy_pipe(
        prompt,
        negative_prompt=negative,
        cfg_scale=cfg_scale,
        infiniteyou_id_embedding=embedding,
        infiniteyou_guidance=1.5,
        embedded_guidance=3.5,
        latents=noise.clone(),
        height=height,
        width=width,
        num_inference_steps=steps,
        t5_sequence_length=text_len,
        progress_bar=False,
    )

    parts = reference_components(tiny_repo)
    net = FluxControlNetModel.from_pretrained(infusenet[0]).eval()
    ref = FluxControlNetPipeline(**parts, controlnet=net)
    transformer, vae, scheduler = parts["transformer"].eval(), parts["vae"], parts["scheduler"]
    with torch.no_grad():
        id_tokens = iy_pipe.infiniteyou_projector(embedding.reshape(1, -1, 512))
        text, pooled, text_ids = ref.encode_prompt(prompt, None, max_sequence_length=text_len)
        negative_text, negative_pooled, negative_ids = ref.encode_prompt(negative, None, max_sequence_length=text_len)
        black = ref.prepare_image(Image.new("RGB", (width, height)), width, height, 1, 1, "cpu", torch.float32)
        control = (vae.encode(black).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
        # a constant image leaves the VAE's GroupNorms dividing rounding noise by sqrt(eps): the two VAEs agree on
        # it to 1e-3 only (on a random image to 3e-6), so the steps below take our encoding of it
        ours = iy_pipe.vae_encode([Image.new("RGB", (width, height))])
        assert max_abs(ours, control) <= 2e-3
        control = pack_latents(ours)
        latents = pack_latents(noise.clone())
        img_ids = ref._prepare_latent_image_ids(1, height // 16, width // 16, "cpu", torch.float32)
        seq = latents.shape[1]
        mu = calculate_shift(
            seq,
            scheduler.config.base_image_seq_len,
            scheduler.config.max_image_seq_len,
            scheduler.config.base_shift,
            scheduler.config.max_shift,
        )
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        for t in scheduler.timesteps:
            timestep = t.expand(1) / 1000
            double, single = net(
                hidden_states=latents,
                controlnet_cond=control,
                conditioning_scale=1.0,
                timestep=timestep,
                guidance=torch.tensor([1.5]),
                pooled_projections=pooled,
                encoder_hidden_states=id_tokens,
                txt_ids=torch.zeros(id_tokens.shape[1], 3),
                img_ids=img_ids,
                return_dict=False,
            )
            common = dict(hidden_states=latents, timestep=timestep, guidance=torch.tensor([3.5]), img_ids=img_ids)
            velocity = transformer(
                **common,
                pooled_projections=pooled,
                encoder_hidden_states=text,
                txt_ids=text_ids,
                controlnet_block_samples=double,
                controlnet_single_block_samples=single,
                return_dict=False,
            )[0]
            if cfg_scale != 1.0:
                unconditional = transformer(
                    **common,
                    pooled_projections=negative_pooled,
                    encoder_hidden_states=negative_text,
                    txt_ids=negative_ids,
                    return_dict=False,
                )[0]
                velocity = unconditional + cfg_scale * (velocity - unconditional)
            latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
    (final,) = finals
    difference = max_abs(pack_latents(final.float()), latents)
    print(
        f"InfiniteYou {steps} steps, cfg {cfg_scale}: max abs {difference:.2e} (latents of max {latents.abs().max():.2f})"
    )
    assert difference <= 1e-4

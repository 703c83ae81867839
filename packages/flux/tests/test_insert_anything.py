"""Insert Anything (`flux1/insert_anything.py`, `FluxImagePipeline(insert_anything_*)`, preset HuanJue/Insert-Anything).

- the preparation and paste-back against DiffSynth-Studio's `FluxImageUnit_InsertAnything.prepare` / `postprocess`
  and the authors' `crop_back` (compiled from the git mirrors, run with cv2: skipped without them), exactly;
  `resize_linear` / `dilate` against cv2 on random shapes, exactly;
- without mirrors: the diptych's invariants, the paste-back round trip, the pipeline run equal to the same pipeline
  fed the prepared Fill / Redux inputs with zero text states and then pasted back, the preset from a fake hub
  folder (its LoRA in the authors' peft layout fused), the CLI flags, refusals.
"""

from __future__ import annotations

import ast
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffsynth_flux_test_helpers import our_pipeline, random_image
from PIL import Image
from safetensors.torch import save_file

from diffsynth.flux.flux1.insert_anything import (
    InsertAnythingInputs,
    dilate,
    pad_square,
    paste_back,
    prepare_insert_anything,
    resize_linear,
    zero_prompt,
)
from diffsynth.flux.flux1.redux import FluxReduxConfig, FluxReduxEmbedder
from diffsynth.flux.pipeline import FluxImagePipeline
from diffsynth.flux.presets import PRESETS
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.testing.modules import load_beside
from diffsynth.runtime.testing.weights import random_weights

tools = load_beside(__file__, "flux1_tools_repo.py", "diffsynth_flux1_tools_repo")
pytestmark = pytest.mark.usefixtures("one_thread")
STUDIO = Path("/work/.mirror/modelscope+DiffSynth-Studio/repo")
AUTHORS = Path("/work/.mirror/song-wensong+insert-anything/repo")
CV2_DIR = os.environ.get(
    "DIFFSYNTH_CV2_DIR", "/tmp/cv2lib"
)  # uv pip install --target /tmp/cv2lib opencv-python-headless
SIDE = 32  # the tiny pipelines' diptych side (the authors' is 768)
FAST = dict(num_inference_steps=2, t5_sequence_length=16, progress_bar=False, seed=0)
SIGLIP = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)
LORA_FILE = "20250321_steps5000_pytorch_lora_weights.safetensors"


# ----------------------------------------------------------------------------------------- inputs
def blob_mask(width: int, height: int, box: tuple[int, int, int, int], seed: int = 0) -> Image.Image:
    """White inside `box` (x1, y1, x2, y2) with a ragged edge, gray noise (partly above 128) elsewhere below it."""
    rng = np.random.default_rng(seed)
    mask = rng.integers(0, 120, (height, width), dtype=np.uint8)
    x1, y1, x2, y2 = box
    mask[y1:y2, x1:x2] = rng.integers(100, 256, (y2 - y1, x2 - x1), dtype=np.uint8)
    return Image.fromarray(mask, mode="L")


# (target size, target mask box, reference size, reference mask box): a square crop, a crop clipped at the top
# (wide), one clipped at the left (tall), a mask over most of a wide image (oblong), one just under 60 %
CASES = {
    "square": ((200, 160), (90, 70, 110, 95), (90, 120), (20, 30, 70, 100)),
    "wide": ((180, 150), (70, 2, 100, 20), (100, 80), (10, 10, 60, 40)),
    "tall": ((150, 180), (2, 80, 25, 110), (64, 64), (5, 5, 59, 60)),
    "most": ((240, 100), (10, 5, 230, 95), (50, 90), (0, 0, 50, 90)),
    "half": ((200, 100), (35, 17, 165, 83), (60, 60), (10, 10, 50, 50)),  # the dilated box: 55 % of the image
}


def case_inputs(name: str, seed: int = 0) -> tuple[Image.Image, Image.Image, Image.Image, Image.Image]:
    (tw, th), tbox, (rw, rh), rbox = CASES[name]
    return (
        random_image(tw, th, seed=seed),
        blob_mask(tw, th, tbox, seed=seed + 1),
        random_image(rw, rh, seed=seed + 2),
        blob_mask(rw, rh, rbox, seed=seed + 3),
    )


# ----------------------------------------------------------------------------------------- against the references
def _cv2(monkeypatch):
    if Path(CV2_DIR).is_dir():
        monkeypatch.setattr(sys, "path", [*sys.path, CV2_DIR])  # appended: it never shadows our numpy
    return pytest.importorskip("cv2")


def _git_show(repo: Path, path: str) -> str:
    if not (repo / "HEAD").exists() and not (repo / ".git").exists():
        pytest.skip(f"the git mirror {repo} is not on this machine")
    out = subprocess.run(["git", "-C", str(repo), "show", f"HEAD:{path}"], capture_output=True, text=True)
    if out.returncode:
        pytest.skip(f"{path} is not in {repo}")
    return out.stdout


def studio_unit():
    """DiffSynth-Studio's `FluxImageUnit_InsertAnything` (its class source alone, on a stub `PipelineUnit`)."""
    source = _git_show(STUDIO, "diffsynth/pipelines/flux_image.py")
    tree = ast.parse(source)
    found = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FluxImageUnit_InsertAnything"]
    if not found:
        pytest.skip("FluxImageUnit_InsertAnything is not in the DiffSynth-Studio mirror")

    class PipelineUnit:
        def __init__(self, **kwargs):
            pass

    namespace = {"np": np, "math": math, "Image": Image, "PipelineUnit": PipelineUnit, "FluxImagePipeline": object}
    exec(compile(ast.Module(body=found, type_ignores=[]), "studio:flux_image.py", "exec"), namespace)
    return namespace["FluxImageUnit_InsertAnything"]()


def authors_utils():
    """The authors' `utils/utils.py` as a module namespace."""
    namespace = {}
    exec(compile(_git_show(AUTHORS, "utils/utils.py"), "authors:utils/utils.py", "exec"), namespace)
    return namespace


def test_resize_and_dilate_equal_cv2_bit_for_bit(monkeypatch):
    """Random uint8 images (3 channels) and 0/1 masks, up, down, exact halves and the same size."""
    cv2 = _cv2(monkeypatch)
    rng = np.random.default_rng(0)
    for trial in range(60):
        h, w = (int(v) for v in rng.integers(1, 200, 2))
        height, width = (int(v) for v in rng.integers(1, 400, 2))
        if trial % 6 == 0:
            height, width = max(h // 2, 1), max(w // 2, 1)
        if trial % 6 == 1:
            height, width = h, w
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = (rng.random((h, w)) > 0.5).astype(np.uint8)
        for array in (image, mask):
            np.testing.assert_array_equal(resize_linear(array, height, width), cv2.resize(array, (width, height)))
        want = cv2.dilate(mask, np.ones((7, 7), np.uint8), iterations=2)
        np.testing.assert_array_equal(dilate(mask), want)


@pytest.mark.parametrize("case", sorted(CASES))
def test_preparation_and_paste_back_equal_diffsynth_studio(monkeypatch, case):
    """Boxes, sizes, the diptych, its mask and the Redux image equal `prepare`'s; `paste_back` equals
    `postprocess` on a random generated diptych (both exact: cv2's resize is reproduced bit for bit)."""
    _cv2(monkeypatch)
    unit = studio_unit()
    inputs = case_inputs(case)
    theirs = unit.prepare(*inputs)
    ours = prepare_insert_anything(*inputs)
    assert (ours.height, ours.width) == (theirs["height"], theirs["width"]) == (768, 1536)
    assert ours.crop.box == tuple(int(v) for v in theirs["tar_box_yyxx_crop"])
    h1, w1, h2, w2 = (int(v) for v in theirs["extra_sizes"])
    assert ours.crop.crop_size == (h1, w1) and ours.crop.padded == h2 == w2
    for attr, key in (("fill_image", "flux_fill_image"), ("fill_mask", "flux_fill_mask"), ("redux_image", "flux_redux_image")):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(getattr(ours, attr)), np.asarray(theirs[key]), err_msg=attr)
    np.testing.assert_array_equal(ours.crop.target, theirs["old_tar_image"])
    generated = random_image(1536, 768, seed=9)
    np.testing.assert_array_equal(
        np.asarray(paste_back(generated, ours.crop)), np.asarray(unit.postprocess(generated, theirs))
    )


def test_square_crop_case_is_square_and_oblong_cases_are_not():
    """The cases above cover both branches of the paste-back (square crop, padded crop, padding on either axis)."""
    sizes = {name: prepare_insert_anything(*case_inputs(name), size=64).crop.crop_size for name in CASES}
    assert sizes["square"][0] == sizes["square"][1]
    assert sizes["wide"][0] < sizes["wide"][1] and sizes["tall"][0] > sizes["tall"][1]
    assert sizes["most"][0] == 100 and sizes["most"][1] > 200  # over 60 % of the image: (nearly) all of it


def test_paste_back_equals_the_authors_crop_back(monkeypatch):
    _cv2(monkeypatch)
    utils = authors_utils()
    for case in sorted(CASES):
        prepared = prepare_insert_anything(*case_inputs(case), size=64)
        crop = prepared.crop
        right = np.asarray(random_image(64, 64, seed=4))
        (h1, w1), side = crop.crop_size, crop.padded
        theirs = utils["crop_back"](
            right.copy(), crop.target.copy(), np.array([h1, w1, side, side]), np.array(crop.box)
        )
        diptych = np.concatenate([np.zeros_like(right), right], axis=1)
        np.testing.assert_array_equal(np.asarray(paste_back(diptych, crop)), theirs, err_msg=case)


# ----------------------------------------------------------------------------------------- invariants
def test_diptych_invariants():
    """1536x768; the left half is the Redux image: the reference object on white (a red object: only red-white
    blends, whatever the noisy background was); the mask's left half black, its right half 0/255 covering the
    (dilated) target mask; the right half is the target crop."""
    target = random_image(200, 160, seed=1)
    target_mask = blob_mask(200, 160, (90, 70, 110, 95), seed=2)
    ref = np.asarray(random_image(90, 120, seed=3)).copy()
    ref[30:100, 20:70] = (255, 0, 0)
    ref_mask = np.zeros((120, 90), dtype=np.uint8)
    ref_mask[30:100, 20:70] = 255
    prepared = prepare_insert_anything(target, target_mask, Image.fromarray(ref), Image.fromarray(ref_mask))
    assert isinstance(prepared, InsertAnythingInputs)
    fill, mask = np.asarray(prepared.fill_image), np.asarray(prepared.fill_mask)
    assert fill.shape == mask.shape == (768, 1536, 3) and prepared.redux_image.size == (768, 768)
    left = fill[:, :768]
    np.testing.assert_array_equal(left, np.asarray(prepared.redux_image))
    assert (left[..., 0] == 255).all() and (left[..., 1] == left[..., 2]).all()  # red-white blends only
    assert (left[..., 1] < 10).any() and (left[:5, :5] == 255).all()  # the object is there, corners white
    assert (mask[:, :768] == 0).all() and set(np.unique(mask)) == {0, 255}
    # the crop: its box holds the target mask's white pixels grown by two 7x7 dilations (6 px each way)
    y1, y2, x1, x2 = prepared.crop.box
    assert y2 - y1 == x2 - x1 and y1 <= 70 - 6 and y2 >= 95 + 6 and x1 <= 90 - 6 and x2 >= 110 + 6
    # the right half is that crop (here square, upscaled): compare with PIL's bilinear, an independent resize
    side = 768
    expected = np.asarray(target.crop((x1, y1, x2, y2)).resize((side, side), Image.BILINEAR), dtype=np.int16)
    assert np.abs(fill[:, 768:].astype(np.int16) - expected).max() <= 2
    repaint = mask[:, 768:, 0] == 255
    rows, cols = np.nonzero(repaint)
    scale = side / (x2 - x1)
    assert rows.min() <= (70 - y1) * scale and rows.max() >= (95 - 1 - y1) * scale
    assert cols.min() <= (90 - x1) * scale and cols.max() >= (110 - 1 - x1) * scale


def test_padding_of_an_oblong_crop_is_white_and_the_mask_black_there():
    prepared = prepare_insert_anything(*case_inputs("tall"), size=96)  # a tall crop: padded left and right
    (h1, w1), side = prepared.crop.crop_size, prepared.crop.padded
    assert h1 == side > w1
    pad = (side - w1) // 2 * 96 // side  # columns of the padding, in the resized half (rounded down)
    assert pad >= 2
    right, mask = np.asarray(prepared.fill_image)[:, 96:], np.asarray(prepared.fill_mask)[:, 96:]
    assert (right[:, : pad - 1] == 255).all() and (right[:, 96 - pad + 1 :] == 255).all()
    assert (mask[:, : pad - 1] == 0).all() and (mask[:, 96 - pad + 1 :] == 0).all()


@pytest.mark.parametrize("case", sorted(CASES))
def test_pasting_the_unchanged_diptych_back_gives_the_source(case):
    """Outside the crop (and its 2-pixel margin) the source is untouched; inside, a smooth source comes back
    within a few levels (down- or up-sampled once each way)."""
    (tw, th), tbox, _, _ = CASES[case]
    yy, xx = np.mgrid[0:th, 0:tw]
    smooth = np.stack([xx * 255 // tw, yy * 255 // th, (xx + yy) * 255 // (tw + th)], -1).astype(np.uint8)
    _, target_mask, ref, ref_mask = case_inputs(case)
    prepared = prepare_insert_anything(Image.fromarray(smooth), target_mask, ref, ref_mask, size=256)
    out = np.asarray(paste_back(prepared.fill_image, prepared.crop)).astype(np.int16)
    y1, y2, x1, x2 = prepared.crop.box
    inner = np.zeros((th, tw), dtype=bool)
    inner[y1 + 2 : y2 - 2, x1 + 2 : x2 - 2] = True
    np.testing.assert_array_equal(out[~inner], smooth[~inner])
    assert np.abs(out[inner] - smooth[inner]).max() <= 3
    assert paste_back(prepared.fill_image, prepared.crop, margin=0).size == (tw, th)


def test_masks_are_binarised_above_128_and_the_target_mask_is_resized():
    target, _, ref, ref_mask = case_inputs("square")
    mask = np.zeros((80, 100), dtype=np.uint8)  # half the target's size
    mask[35:48, 45:55] = 128  # not above 128: ignored
    mask[36:46, 46:54] = 129
    half = prepare_insert_anything(target, Image.fromarray(mask), ref, ref_mask, size=64)
    full = np.zeros((160, 200), dtype=np.uint8)
    full[72:92, 92:108] = 255  # 129 -> 1, resized x2 (bilinear: the 2x edge pixels round to the same box)
    same = prepare_insert_anything(target, Image.fromarray(full), ref, ref_mask, size=64)
    assert half.crop.box == same.crop.box
    np.testing.assert_array_equal(np.asarray(half.fill_mask), np.asarray(same.fill_mask))


# ----------------------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def redux_files(tmp_path_factory):
    """A tiny SigLIP tower (hub layout: config.json + model.safetensors) and Redux embedder for the tiny DiT."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    root = tmp_path_factory.mktemp("insert-redux")
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**SIGLIP)).save_pretrained(root / "image_encoder")
    embedder = random_weights(FluxReduxEmbedder(FluxReduxConfig(32, 32)), 3, scale=0.2)
    (root / "image_embedder").mkdir()
    save_file(embedder.state_dict(), str(root / "image_embedder" / "diffusion_pytorch_model.safetensors"))
    return root


@pytest.fixture(scope="module")
def fill_repo(tiny_repo, tmp_path_factory):
    return tools.tools_repo(tiny_repo, tmp_path_factory.mktemp("insert-fill") / "repo", tools.FILL_CHANNELS, seed=5)


@pytest.fixture(scope="module")
def pipe(fill_repo, redux_files):
    pipe = our_pipeline(fill_repo)
    pipe.load_redux(str(redux_files / "image_embedder"), image_encoder=str(redux_files / "image_encoder"))
    return pipe


def _insert(pipe, inputs=None, **kwargs):
    inputs = case_inputs("square") if inputs is None else inputs
    names = ("insert_anything_source_image", "insert_anything_source_mask")
    names += ("insert_anything_ref_image", "insert_anything_ref_mask")
    return pipe(**dict(zip(names, inputs, strict=True)), **{"height": SIDE, **FAST, **kwargs})


def test_pipeline_equals_fill_and_redux_on_the_prepared_inputs_then_pasted_back(pipe, monkeypatch):
    """The insert call is the Fill + Redux call on `prepare_insert_anything`'s diptych, with zero text states
    (the text encoders are not run) and the Fill defaults (guidance 30), its output pasted back."""
    seen = []
    hook = pipe.dit.register_forward_pre_hook(lambda m, args: seen.append((args[2].clone(), args[5].clone(), args[6])))
    try:
        with monkeypatch.context() as m:
            m.setattr(pipe, "encode_prompt", lambda *a, **k: pytest.fail("Insert Anything encoded a prompt"))
            got = _insert(pipe, output_type="np")
        text, pooled, guidance = seen[0]
        assert text.shape == (1, 16 + 16, 32) and torch.equal(text[:, :16], torch.zeros(1, 16, 32))
        assert text[:, 16:].abs().sum() > 0 and torch.equal(pooled, torch.zeros(1, 32)) and float(guidance[0]) == 30.0
        prepared = prepare_insert_anything(*case_inputs("square"), size=SIDE)
        seen.clear()
        with monkeypatch.context() as m:
            m.setattr(pipe, "encode_prompt", lambda prompts, text_len: zero_prompt(len(prompts), text_len, 32, 32))
            diptych = pipe(
                "ignored", flux_fill_image=prepared.fill_image, flux_fill_mask=prepared.fill_mask,
                flux_redux_image=prepared.redux_image, height=SIDE, width=2 * SIDE, **FAST,
            )  # fmt: skip
    finally:
        hook.remove()
    assert torch.equal(seen[0][0], text) and diptych.size == (2 * SIDE, SIDE)
    want = np.asarray(paste_back(diptych, prepared.crop), dtype=np.float32) / 255.0
    assert got.shape == (1, 160, 200, 3)
    np.testing.assert_array_equal(got[0], want)
    pil = _insert(pipe)
    assert isinstance(pil, Image.Image) and pil.size == (200, 160)
    np.testing.assert_array_equal(np.asarray(pil, dtype=np.float32) / 255.0, want)
    pt = _insert(pipe, output_type="pt")
    assert pt.shape == (1, 3, 160, 200) and torch.equal(pt[0].permute(1, 2, 0), torch.from_numpy(want))


def test_refusals(pipe, fill_repo, tiny_pipe):
    inputs = case_inputs("square")
    image = random_image(SIDE, SIDE)
    with pytest.raises(ConfigError, match="needs all of .*insert_anything_ref_mask missing"):
        pipe(insert_anything_source_image=inputs[0], insert_anything_source_mask=inputs[1],
             insert_anything_ref_image=inputs[2], **FAST)  # fmt: skip
    black = Image.new("L", inputs[1].size, 128)
    with pytest.raises(ConfigError, match="insert_anything_source_mask has no white pixel"):
        _insert(pipe, (inputs[0], black, *inputs[2:]))
    with pytest.raises(ConfigError, match="insert_anything_ref_mask has no white pixel"):
        _insert(pipe, (*inputs[:3], Image.new("L", inputs[3].size, 0)))
    with pytest.raises(ConfigError, match="insert_anything_ref_mask is 10x10; it must be the size of"):
        _insert(pipe, (*inputs[:3], Image.new("L", (10, 10), 255)))
    with pytest.raises(ConfigError, match="insert_anything_ref_image must be a file path or a PIL.Image"):
        _insert(pipe, (*inputs[:2], np.zeros((8, 8, 3)), inputs[3]))
    for name in ("flux_fill_image", "flux_fill_mask", "flux_redux_image", "kontext_images", "input_image"):
        with pytest.raises(ConfigError, match=f"{name} cannot be combined with insert_anything_"):
            _insert(pipe, **{name: image})
    with pytest.raises(ConfigError, match="prompt='a cat' is not read by Insert Anything"):
        _insert(pipe, prompt="a cat")
    with pytest.raises(ConfigError, match="cfg_scale=2.0: Insert Anything has no negative prompt"):
        _insert(pipe, cfg_scale=2.0)
    with pytest.raises(ConfigError, match="width=48: an Insert Anything diptych is twice as wide as high \\(64\\)"):
        _insert(pipe, width=48)
    with pytest.raises(ConfigError, match="height=40 is not a multiple of 16"):
        _insert(pipe, height=40)
    with pytest.raises(ConfigError, match="need a FLUX.1 Fill DiT .*plain FLUX.1 DiT"):
        _insert(tiny_pipe)
    with pytest.raises(ConfigError, match="read by FLUX.1 Redux, which is not loaded: use pipe.load_redux"):
        _insert(our_pipeline(fill_repo))


# ----------------------------------------------------------------------------------------- preset and CLI
def _authors_lora(dit, seed: int = 7) -> dict[str, torch.Tensor]:
    """A peft LoRA on the authors' target modules (their training config's regex), diffusers names."""
    from diffsynth.flux.flux1.formats import ours_to_diffusers

    shapes = {k: v.shape for k, v in ours_to_diffusers(dit.state_dict()).items()}
    double = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "norm1.linear", "ff.net.2")
    single = ("norm.linear", "proj_mlp", "proj_out", "attn.to_q", "attn.to_k", "attn.to_v")
    names = ["x_embedder"]
    names += [f"transformer_blocks.{i}.{n}" for i in range(dit.config.depth) for n in double]
    names += [f"single_transformer_blocks.{i}.{n}" for i in range(dit.config.depth_single_blocks) for n in single]
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in names:
        out_features, in_features = shapes[f"{name}.weight"]
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(4, in_features, generator=g) * 0.1
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(out_features, 4, generator=g) * 0.1
    return state


@pytest.fixture(scope="module")
def hub(fill_repo, redux_files, tmp_path_factory):
    """A model base path laid out as the preset fetches it: Fill-dev (BFL files), Redux-dev's image encoder and
    embedder (diffusers folders), and the LoRA file."""
    import shutil

    base = tmp_path_factory.mktemp("insert-hub")
    tools.bfl_layout(fill_repo, base / "black-forest-labs" / "FLUX.1-Fill-dev", "flux1-fill-dev.safetensors")
    shutil.copytree(redux_files, base / "black-forest-labs" / "FLUX.1-Redux-dev")
    lora = base / "HuanJue" / "Insert-Anything" / LORA_FILE
    lora.parent.mkdir(parents=True)
    save_file(_authors_lora(tools.tools_dit(Path(fill_repo), tools.FILL_CHANNELS, seed=5)), str(lora))
    return base


def test_preset_resolves_fill_redux_and_the_lora_from_the_hub(hub, pipe, monkeypatch):
    preset = PRESETS["HuanJue/Insert-Anything"]
    assert preset.defaults == {"num_inference_steps": 50, "embedded_guidance": 30.0, "cfg_scale": 1.0}
    assert [(f.model_id, f.origin_file_pattern) for f in preset.files][-2:] == [
        ("black-forest-labs/FLUX.1-Redux-dev", "image_encoder/model.safetensors"),
        ("black-forest-labs/FLUX.1-Redux-dev", "image_embedder/diffusion_pytorch_model.safetensors"),
    ]
    assert [(lo.model_id, lo.origin_file_pattern) for lo in preset.loras] == [("HuanJue/Insert-Anything", LORA_FILE)]
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(hub))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    loaded = FluxImagePipeline.from_pretrained("HuanJue/Insert-Anything", torch_dtype="float32", device="cpu")
    assert loaded.flux_redux is not None and loaded.flux_redux_image_encoder.kind == "siglip"
    plain = FluxImagePipeline.from_pretrained("black-forest-labs/FLUX.1-Fill-dev", torch_dtype="float32", device="cpu")
    ours, before = loaded.dit.state_dict(), {k: v.clone() for k, v in plain.dit.state_dict().items()}
    plain.load_lora(str(hub / "HuanJue" / "Insert-Anything" / LORA_FILE))
    after = plain.dit.state_dict()
    assert all(torch.equal(ours[k], after[k]) for k in after)
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert "img_in.weight" in changed and "double_blocks.0.img_mod.lin.weight" in changed
    assert "single_blocks.1.linear1.weight" in changed and "single_blocks.1.modulation.lin.weight" in changed
    seen = []
    hook = loaded.dit.register_forward_pre_hook(lambda m, args: seen.append(1))
    try:
        out = _insert(loaded, num_inference_steps=None, t5_sequence_length=16, output_type="np")
    finally:
        hook.remove()
    assert len(seen) == 50 and out.shape == (1, 160, 200, 3)  # the preset's 50 steps


def test_cli_insert_flags(hub, tmp_path, monkeypatch, capsys):
    """`--insert-source-image/-mask --insert-ref-image/-mask` need no --prompt and equal the Python call."""
    from diffsynth.runtime.cli import main

    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(hub))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    paths = []
    for name, image in zip(("source", "source_mask", "ref", "ref_mask"), case_inputs("wide"), strict=True):
        image.save(tmp_path / f"{name}.png")
        paths.append(str(tmp_path / f"{name}.png"))
    out = tmp_path / "out.png"
    args = ["generate", "--model", "HuanJue/Insert-Anything", "--seed", "3", "--output", str(out), "--height", "32"]
    args += ["--insert-source-image", paths[0], "--insert-source-mask", paths[1]]
    args += ["--insert-ref-image", paths[2], "--insert-ref-mask", paths[3]]
    assert main([*args, "--steps", "1", "--device", "cpu", "--dtype", "float32"]) == 0
    loaded = FluxImagePipeline.from_pretrained("HuanJue/Insert-Anything", torch_dtype="float32", device="cpu")
    want = _insert(loaded, paths, seed=3, num_inference_steps=1, t5_sequence_length=None)
    with Image.open(out) as written:
        np.testing.assert_array_equal(np.asarray(written), np.asarray(want))
    capsys.readouterr()
    assert main([*args[:-4], "--steps", "1", "--device", "cpu", "--dtype", "float32"]) != 0
    assert "insert_anything_ref_image, insert_anything_ref_mask missing" in capsys.readouterr().err


def test_pad_square_centres_the_smaller_half_first():
    a = np.ones((2, 5), dtype=np.uint8)
    padded = pad_square(a, 7)
    assert padded.shape == (5, 5) and (padded[0] == 7).all() and (padded[3:] == 7).all() and (padded[1:3] == 1).all()

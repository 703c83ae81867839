"""Wan VACE: the control branch of the DiT, its checkpoint layouts, and the pipeline's `vace_*` arguments.

The DiT and the pipeline are compared with diffusers' `WanVACETransformer3DModel` / `WanVACEPipeline` on
tiny random models; the full-size layouts with diffusers' model at the released configs on the meta device.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.testing import conformance as cf
from diffsynth.wan.dit import WanDiT, WanDiTConfig
from diffsynth.wan.formats import DIT_SPEC, config_from_state, diffusers_to_ours, ours_to_diffusers
from diffsynth.wan.vace import fit_reference, fold_mask


def _beside(name: str):
    """Helpers of another test module of this folder, loaded by path."""
    spec = importlib.util.spec_from_file_location(f"wan_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


T = _beside("test_dit")
P = _beside("test_pipeline")
diffusers_fields = _beside("test_dit_parity").diffusers_fields

LAYERS = (0, 2)
VACE_IN = 12


def vace_model(seed: int = 3, **overrides) -> WanDiT:
    return T.make_model(T.tiny_config("t2v", num_layers=4, vace_layers=LAYERS, vace_in_dim=VACE_IN, **overrides), seed)


def vace_inputs(batch: int = 2, size=(3, 4, 6), control_frames: int | None = None, seed: int = 1):
    (x, t, context), _ = T.inputs("t2v", batch=batch, size=size, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    control = torch.randn(batch, VACE_IN, control_frames or size[0], *size[1:], generator=g)
    return (x, t, context), {"vace_context": control}


def diffusers_vace(ours: WanDiT):
    from diffusers import WanVACETransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    cfg = ours.config
    fields = diffusers_fields(cfg)
    model = WanVACETransformer3DModel(**fields, vace_layers=list(cfg.vace_layers), vace_in_channels=cfg.vace_in_dim)
    model.load_state_dict(convert_wan_transformer_to_diffusers(dict(ours.state_dict())), strict=True)
    return model.eval()


# ------------------------------------------------------------------ the DiT
@pytest.mark.parity
@pytest.mark.parametrize(
    ("batch", "size", "control_frames", "scale"),
    [(1, (2, 4, 4), None, 1.0), (2, (3, 4, 6), None, (0.7, 1.3)), (2, (3, 4, 6), 2, 0.5)],
)
def test_dit_matches_diffusers(batch, size, control_frames, scale):
    """Hints after layers 0 and 2 of 4, scaled per layer; a control shorter than the video is zero-padded."""
    pytest.importorskip("diffusers")
    ours = vace_model().eval()
    reference = diffusers_vace(ours)
    (x, t, context), kwargs = vace_inputs(batch, size, control_frames)
    scales = torch.tensor([scale] * len(LAYERS) if isinstance(scale, float) else scale)
    with torch.no_grad():
        got = ours(x, t, context, vace_scale=scale, **kwargs)
        padded = torch.nn.functional.pad(context, (0, 0, 0, ours.config.text_len - context.shape[1]))
        want = reference(
            x, t, padded, control_hidden_states=kwargs["vace_context"], control_hidden_states_scale=scales,
            return_dict=False,
        )[0]  # fmt: skip
        plain = ours(x, t, context)
    assert (got - plain).abs().max() > 0.1  # the control changes the output
    assert (got - want).abs().max().item() <= 1e-5


def test_zero_scale_or_no_context_is_the_base_model():
    ours = vace_model().eval()
    (x, t, context), kwargs = vace_inputs()
    with torch.no_grad():
        assert torch.equal(ours(x, t, context, vace_scale=0.0, **kwargs), ours(x, t, context))


def test_control_blocks_run_right_after_their_main_layer():
    ours = vace_model().eval()
    order = []
    for name, module in [*ours.blocks.named_children(), *(("v" + n, m) for n, m in ours.vace_blocks.named_children())]:
        module.register_forward_pre_hook(lambda *_, n=name: order.append(n))
    with torch.no_grad():
        ours(*vace_inputs()[0], **vace_inputs()[1])
    assert order == ["0", "v0", "1", "2", "v1", "3"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vace_context": torch.zeros(2, VACE_IN + 1, 3, 4, 6)}, "vace_in_dim"),
        ({"vace_context": torch.zeros(2, VACE_IN, 3, 4, 4)}, r"\(H, W\)"),
        ({"vace_context": torch.zeros(2, VACE_IN, 4, 4, 6)}, "frames"),
        ({"vace_context": torch.zeros(2, VACE_IN, 3, 4, 6), "vace_scale": (1.0, 2.0, 3.0)}, "vace_scale"),
        ({"vace_context": torch.zeros(2, VACE_IN, 3, 4, 6), "vace_scale": float("nan")}, "vace_scale=nan"),
    ],
)
def test_bad_control_inputs_name_the_argument(kwargs, message):
    (x, t, context), _ = vace_inputs()
    with pytest.raises(ValueError, match=message):
        vace_model()(x, t, context, **kwargs)


def test_a_base_dit_refuses_a_control_context():
    (x, t, context), kwargs = vace_inputs()
    with pytest.raises(ValueError, match="no VACE blocks"):
        T.make_model("t2v")(x, t, context, **kwargs)


@pytest.mark.parametrize("layers", [(1, 2), (0, 2, 2), (0, 4)])
def test_config_refuses_bad_vace_layers(layers):
    with pytest.raises(ValueError, match="vace_layers"):
        T.tiny_config("t2v", num_layers=4, vace_layers=layers)


def test_conformance_with_a_control_context():
    args, kwargs = vace_inputs()
    other = vace_inputs(seed=2)[0]
    cf.check_forward(vace_model, args, kwargs, expected_shapes=[args[0].shape])
    cf.check_backward(vace_model, args, kwargs)
    cf.check_gradient_checkpointing(vace_model, args, kwargs, atol=1e-6)
    cf.check_meta_load(vace_model, args, kwargs)
    cf.check_declared_units(vace_model)
    assert vace_model().offload_units == ("blocks", "vace_blocks")
    cf.check_first_block_cache(vace_model, args, kwargs, other_args=other, blocks=("blocks",))
    cf.check_tea_cache(vace_model, args, kwargs, other_args=other, blocks=("blocks",))


# ------------------------------------------------------------------ checkpoint layouts
# The config.json of Wan-AI/Wan2.1-VACE-14B and -1.3B: the authors' `VaceWanModel` arguments.
VACE_JSON = {
    "14B": {"_class_name": "VaceWanModel", "dim": 5120, "eps": 1e-06, "ffn_dim": 13824, "freq_dim": 256,
            "in_dim": 16, "model_type": "vace", "num_heads": 40, "num_layers": 40, "out_dim": 16, "text_len": 512,
            "vace_in_dim": 96, "vace_layers": [0, 5, 10, 15, 20, 25, 30, 35]},
    "1.3B": {"_class_name": "VaceWanModel", "dim": 1536, "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256,
             "in_dim": 16, "model_type": "vace", "num_heads": 12, "num_layers": 30, "out_dim": 16, "text_len": 512,
             "vace_in_dim": 96, "vace_layers": list(range(0, 30, 2))},
}  # fmt: skip
RELEASED = {
    "14B": WanDiTConfig(vace_layers=tuple(range(0, 40, 5))),
    "1.3B": WanDiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, vace_layers=tuple(range(0, 30, 2))),
}


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(RELEASED))
def test_full_size_layout_equals_diffusers_model_of_the_released_config(name):
    """diffusers' `WanVACETransformer3DModel` at the released config, renamed to the original keys, has
    exactly our keys and shapes; from those shapes alone (and with the authors' json) the config is derived."""
    pytest.importorskip("diffusers")
    from diffusers import WanVACETransformer3DModel

    config = RELEASED[name]
    with torch.device("meta"):
        theirs = WanVACETransformer3DModel(
            num_attention_heads=config.num_heads,
            attention_head_dim=config.head_dim,
            ffn_dim=config.ffn_dim,
            num_layers=config.num_layers,
            vace_layers=list(config.vace_layers),
            vace_in_channels=96,
        ).state_dict()
        ours = WanDiT(config).state_dict()
    layout = DIT_SPEC.match(theirs)
    assert layout is not None and layout.name == "diffusers"
    renamed = layout.to_ours(theirs)
    assert {k: tuple(v.shape) for k, v in renamed.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert config_from_state(ours, None) == config
    assert config_from_state(ours, VACE_JSON[name]) == config
    assert [k for k in ours if "before_proj" in k] == [
        "vace_blocks.0.before_proj.weight",
        "vace_blocks.0.before_proj.bias",
    ]
    assert len([k for k in ours if "after_proj.weight" in k]) == len(config.vace_layers)


def test_diffusers_json_and_layer_count_contradictions():
    state = vace_model().state_dict()
    fields = dict(num_heads=2, text_len=512)
    assert config_from_state(state, {**fields, "vace_layers": [0, 2]}).vace_layers == LAYERS
    assert config_from_state(state, {**fields, "vace_layers": [0, 3]}).vace_layers == (0, 3)  # not fixed by shapes
    assert config_from_state(state, fields).vace_layers == LAYERS  # evenly spread, as released
    with pytest.raises(ConfigError, match="vace_layers"):
        config_from_state(state, {**fields, "vace_layers": [0, 1, 2]})
    diffusers_json = {"_class_name": "WanVACETransformer3DModel", "num_attention_heads": 2, "attention_head_dim": 16,
                      "vace_layers": [0, 2], "vace_in_channels": VACE_IN}  # fmt: skip
    assert config_from_state(state, diffusers_json) == vace_model().config


@pytest.mark.parity
def test_our_converter_and_diffusers_agree_both_ways():
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    ours = vace_model().state_dict()
    theirs = convert_wan_transformer_to_diffusers(dict(ours))
    assert ours_to_diffusers(dict(ours)).keys() == theirs.keys()
    back = diffusers_to_ours(theirs)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], v) for k, v in ours.items())


# ------------------------------------------------------------------ preparation
def test_fold_mask_puts_each_pixel_cell_on_channels():
    mask = torch.arange(5 * 16 * 24, dtype=torch.float32).view(5, 16, 24)
    folded = fold_mask(mask, 2, 8)
    assert folded.shape == (64, 2, 2, 3)
    # nearest-exact over time: latent frame k of 2 takes pixel frame floor((k + 0.5) * 5 / 2), i.e. 1 and 3;
    # channel (row offset 3, column offset 5) of latent cell (1, 2)
    assert folded[3 * 8 + 5, 0, 1, 2] == mask[1, 8 + 3, 16 + 5]
    assert torch.equal(folded[:, 1], fold_mask(mask[3:4], 1, 8)[:, 0])


def test_reference_fits_on_a_white_canvas():
    wide = Image.fromarray(np.zeros((8, 32, 3), dtype=np.uint8))  # black, 4:1
    fitted = fit_reference(wide, 16, 32)
    assert fitted.shape == (3, 16, 32)
    assert torch.all(fitted[:, 4:12] == -1) and torch.all(fitted[:, :4] == 1) and torch.all(fitted[:, 12:] == 1)
    same = P.image(3, (32, 16))
    assert torch.equal(fit_reference(same, 16, 32), torch.tensor(np.asarray(same)).permute(2, 0, 1) / 127.5 - 1)


# ------------------------------------------------------------------ the pipeline
FAST = dict(P.FAST)


@pytest.fixture(scope="module")
def vace_repo(tiny_repo_factory):
    return tiny_repo_factory("vace")


@pytest.fixture(scope="module")
def vace_pipe(vace_repo):
    return P.load(vace_repo)


def control(frames: int = 5, seed: int = 0, size=(32, 32)):
    """A control video and a mask repainting a box in the middle frames."""
    video = [P.image(seed + i, size) for i in range(frames)]
    masks = []
    for i in range(frames):
        m = np.zeros((size[1], size[0]), dtype=np.uint8)
        if 0 < i < frames - 1:
            m[8:24, 4:20] = 255
        masks.append(Image.fromarray(m).convert("RGB"))
    return video, masks


def repo_dit(folder: Path) -> WanDiT:
    """Our DiT from a tiny repo folder (its file and the authors' config.json)."""
    from safetensors.torch import load_file

    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    dit = WanDiT(config_from_state(state, json.loads((folder / "config.json").read_text())))
    dit.load_state_dict(state)
    return dit


def diffusers_vace_pipe(folders, ours, monkeypatch, parts_repo):
    """diffusers' `WanVACEPipeline` over the DiT(s) in `folders` (two: the A14B experts) and the encoders of
    `parts_repo`."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.wan import pipeline_wan_vace

    if not hasattr(pipeline_wan_vace, "ftfy"):  # its prompt cleaning calls ftfy without checking it is installed
        monkeypatch.setattr(
            pipeline_wan_vace, "ftfy", type("NoFtfy", (), {"fix_text": staticmethod(str)}), raising=False
        )
    experts = [diffusers_vace(repo_dit(folder)) for folder in folders]
    two = {"transformer_2": experts[1], "boundary_ratio": 0.875} if len(experts) == 2 else {}
    scheduler, sigmas = P.euler(16.0 if not two else 5.0, 3 if not two else 4)
    ref = diffusers.WanVACEPipeline(
        scheduler=scheduler, transformer=experts[0], **two, **P.diffusers_parts(parts_repo, ours)
    )
    ref.set_progress_bar_config(disable=True)
    return ref, sigmas


@pytest.mark.parity
@pytest.mark.parametrize("with_reference", [False, True])
def test_pipeline_matches_diffusers(vace_repo, vace_pipe, with_reference, monkeypatch):
    """Control video + mask (+ one reference image of another size, letterboxed), guidance 4, 3 steps."""
    ref, sigmas = diffusers_vace_pipe([vace_repo], vace_pipe, monkeypatch, vace_repo)
    video, masks = control()
    reference = P.image(9, (24, 40)) if with_reference else None
    frames = 2 + (1 if with_reference else 0)
    noise = torch.randn(1, 16, frames, 4, 4, generator=torch.Generator().manual_seed(13))
    expected = ref(
        prompt=P.PROMPT, negative_prompt="bad quality", video=video, mask=masks,
        reference_images=[reference] if with_reference else None, conditioning_scale=0.8, guidance_scale=4.0,
        num_inference_steps=3, latents=noise.clone(), **P.PARITY,
    ).frames  # fmt: skip
    got = vace_pipe(
        P.PROMPT, negative_prompt="bad quality", vace_video=video, vace_video_mask=masks,
        vace_reference_image=reference, vace_scale=0.8, cfg_scale=4.0, sigmas=sigmas, latents=noise.clone(),
        tiled=False, progress_bar=False, **P.PARITY,
    )  # fmt: skip
    assert got.shape == expected.shape == (1, 5, 32, 32, 3)
    assert np.abs(got - expected).max() <= 1e-4


def test_control_reaches_the_dit_and_scale_zero_ignores_it(vace_pipe):
    video, masks = control()
    base = vace_pipe(P.PROMPT, seed=7, output_type="pt", **FAST)
    off = vace_pipe(P.PROMPT, seed=7, output_type="pt", vace_video=video, vace_video_mask=masks, vace_scale=0.0, **FAST)
    on = vace_pipe(P.PROMPT, seed=7, output_type="pt", vace_video=video, vace_video_mask=masks, **FAST)
    torch.testing.assert_close(off, base, atol=1e-6, rtol=0)
    assert (on - base).abs().max() > 1e-3


def test_references_lead_the_noise_and_are_dropped(vace_pipe, monkeypatch):
    """With R references the seed's noise is drawn for T + R frames and its last R frames lead (DiffSynth-Studio's
    order); the R leading frames are dropped before decoding."""
    seen = []
    original = type(vace_pipe).denoise

    def spy(self, x, *args, **kwargs):
        seen.append(x.clone())
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(type(vace_pipe), "denoise", spy)
    refs = [P.image(1), P.image(2)]
    out = vace_pipe(P.PROMPT, seed=7, output_type="pt", vace_reference_image=refs, **FAST)
    vace_pipe(P.PROMPT, seed=7, output_type="pt", vace_video_mask=Image.new("L", (32, 32), 255), **FAST)
    drawn = torch.randn(1, 16, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(seen[0], torch.cat([drawn[:, :, 2:], drawn[:, :, :2]], dim=2))
    assert torch.equal(seen[1], torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(7)))
    assert out.shape == (1, 3, 5, 32, 32)


def test_vram_managed_and_cached_pipelines_give_the_same_video(vace_repo, vace_pipe):
    video, masks = control()
    kwargs = dict(vace_video=video, vace_video_mask=masks, vace_reference_image=P.image(4), seed=3, output_type="pt")
    want = vace_pipe(P.PROMPT, **kwargs, **FAST)
    managed = P.WanVideoPipeline.from_pretrained(str(vace_repo), torch_dtype="float32", device="cpu", vram_limit=0)
    torch.testing.assert_close(managed(P.PROMPT, **kwargs, **FAST), want, atol=1e-5, rtol=0)
    vace_pipe.enable_first_block_cache(0.0)
    try:
        torch.testing.assert_close(vace_pipe(P.PROMPT, **kwargs, **FAST), want, atol=0, rtol=0)
    finally:
        vace_pipe.disable_first_block_cache()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vace_scale": (1.0, 2.0, 3.0)}, "vace_scale"),
        ({"vace_scale": "strong"}, "vace_scale"),
        ({"vace_scale": float("nan")}, "vace_scale=nan must be finite"),
        ({"vace_scale": [1.0, float("inf")]}, r"vace_scale=\[1.0, inf\] must be finite"),
        ({"vace_video": [P.image(0)] * 3}, "fewer than num_frames"),
        ({"vace_video_mask": [P.image(0)] * 3}, "fewer than num_frames"),
        ({"vace_reference_image": []}, "empty"),
        ({"vace_video": 5}, "vace_video"),
    ],
)
def test_bad_vace_inputs_name_the_argument(vace_pipe, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        vace_pipe(P.PROMPT, seed=1, **{"vace_video_mask": Image.new("L", (32, 32), 255), **kwargs}, **FAST)


def test_a_model_without_vace_refuses_the_arguments(tiny_repo):
    with pytest.raises(ConfigError, match="VACE model"):
        P.load(tiny_repo)(P.PROMPT, seed=1, vace_reference_image=P.image(0), **FAST)


def test_cli_vace_flags(vace_repo, tmp_path, monkeypatch):
    """`--vace-video` / `--vace-mask` (an image for every frame) / `--vace-reference-image` (repeatable) /
    `--vace-scale` reach the pipeline as its `vace_*` arguments and the mp4 is written."""
    from diffsynth.runtime.media import load_video, save_video

    video = tmp_path / "control.mp4"
    save_video(control()[0], video, fps=16)
    Image.new("L", (32, 32), 255).save(tmp_path / "mask.png")
    for k in (1, 2):
        P.image(k).save(tmp_path / f"ref{k}.png")
    flags = ["--vace-video", str(video), "--vace-mask", str(tmp_path / "mask.png"), "--vace-scale", "0.7"]
    flags += [
        "--vace-reference-image",
        str(tmp_path / "ref1.png"),
        "--vace-reference-image",
        str(tmp_path / "ref2.png"),
    ]
    seen, results, out = P.run_cli(vace_repo, tmp_path, monkeypatch, *flags)
    assert seen["vace_video"] == str(video) and seen["vace_video_mask"] == str(tmp_path / "mask.png")
    assert seen["vace_reference_image"] == [str(tmp_path / f"ref{k}.png") for k in (1, 2)]
    assert seen["vace_scale"] == 0.7 and len(load_video(out)) == 5
    # the files mean what the same frames and images passed directly mean
    monkeypatch.undo()  # the pipeline's own call again
    direct = P.load(tmp_path / "repo")(
        P.PROMPT, seed=0, vace_video=load_video(video), vace_video_mask=Image.new("L", (32, 32), 255),
        vace_reference_image=[Image.open(tmp_path / f"ref{k}.png") for k in (1, 2)], vace_scale=0.7,
    )  # fmt: skip
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(direct, results[0], strict=True))


# ------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def vace_task(vace_repo):
    from diffsynth.wan.pipeline import folder_model_configs
    from diffsynth.wan.training import WanTrainingTask

    configs, tokenizer = folder_model_configs(vace_repo)
    return WanTrainingTask.from_pretrained(configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu")


def vace_row(seed: int = 0, references: int = 1):
    """A training row as the data loader gives it: tensors in [-1, 1] (an 8-bit picture each)."""
    from diffsynth.runtime.media import pil_to_tensor

    video, masks = control(seed=seed)
    row = {
        "prompt": P.PROMPT,
        "video": pil_to_tensor([P.image(seed + 20 + i) for i in range(5)]).transpose(0, 1),
        "vace_video": pil_to_tensor(video).transpose(0, 1),
        "vace_video_mask": pil_to_tensor(masks).transpose(0, 1),
    }
    if references:
        row["vace_reference_image"] = [pil_to_tensor(P.image(seed + 40 + k))[0] for k in range(references)]
    return row, video, masks


def test_training_encodes_the_control_as_the_pipeline_does(vace_task, vace_pipe):
    from diffsynth.wan.pipeline import WanConditions
    from diffsynth.wan.vace import prepare_vace

    row, video, masks = vace_row(references=2)
    sample = vace_task.encode([row])[0]
    refs = [P.image(40), P.image(41)]
    want = prepare_vace(vace_pipe, video, masks, refs, 1.0, 5, 32, 32, {})
    torch.testing.assert_close(sample["vace_context"], want.context[0], atol=1e-6, rtol=0)
    clean = vace_pipe.vae.encode(row["video"][None])[0]
    torch.testing.assert_close(sample["latents"], torch.cat([want.references[0], clean], dim=1), atol=1e-6, rtol=0)
    # the model call is the pipeline's, with the control
    batch = vace_task.collate([sample])
    noisy = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = vace_task.velocity(vace_task.models["dit"], batch, noisy, torch.tensor([0.5]))
        conditions = WanConditions(batch["text"], vace_context=batch["vace_context"])
        want_velocity = vace_pipe.predict(vace_pipe.dit, noisy, torch.tensor([500.0]), conditions, None, 1.0, False)
    torch.testing.assert_close(got, want_velocity, atol=1e-6, rtol=0)


def test_validation_images_are_the_samples_reference_images(vace_task):
    images = [P.image(1), P.image(2)]
    assert vace_task.reference_arguments(images) == {"vace_reference_image": images}
    assert vace_task.reference_arguments([]) == {}


def test_training_refuses_vace_columns_for_a_base_model_and_unloaded_paths(tiny_repo, vace_task):
    from diffsynth.wan.pipeline import folder_model_configs
    from diffsynth.wan.training import WanTrainingTask

    configs, tokenizer = folder_model_configs(tiny_repo)
    base = WanTrainingTask.from_pretrained(configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu")
    row = vace_row(references=0)[0]
    with pytest.raises(ConfigError, match="no VACE blocks"):
        base.encode([row])
    with pytest.raises(ConfigError, match="data_file_keys"):
        vace_task.encode([{**row, "vace_video": "control.mp4"}])


def vace_dataset(folder: Path) -> Path:
    """Two rows: a target video, its control video and one reference image each."""
    from diffsynth.runtime.media import save_video
    from diffsynth.training.testing import write_metadata

    rows = []
    for i in range(2):
        video, _ = control(seed=10 * i)
        save_video([P.image(10 * i + 20 + f) for f in range(5)], folder / f"clip{i}.mp4", fps=8)
        save_video(video, folder / f"control{i}.mp4", fps=8)
        P.image(10 * i + 40).save(folder / f"ref{i}.png")
        rows.append({"video": f"clip{i}.mp4", "vace_video": f"control{i}.mp4", "vace_reference_image": f"ref{i}.png"})
        rows[-1]["prompt"] = P.PROMPT
    return write_metadata(folder, rows)


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_trainer_trains_the_control_branch_alone(vace_repo, tmp_path, mode):
    """`--lora_base_model vace` / `--trainable_models vace` (DiffSynth-Studio's flags): only the VACE blocks and
    patch embedding learn; the main DiT keeps its weights, and the LoRA file names only control-branch layers."""
    testing = pytest.importorskip("diffsynth.training.testing")
    from diffsynth.training.trainer import setup, train

    dataset = vace_dataset(tmp_path / "data")
    adapter = {"lora_base_model": "vace"} if mode == "lora" else {"trainable_models": ["vace"]}
    config = testing.tiny_config(
        vace_repo, "wan", dataset, tmp_path / "out", num_frames=5, max_pixels=32 * 32, bucket_step=32,
        data_file_keys=["video", "vace_video", "vace_reference_image"], batch_size=1, max_steps=2, **adapter,
    )  # fmt: skip
    run = setup(config)
    names = list(run.trainable)
    assert names and all(n.startswith(("vace_blocks.", "vace_patch_embedding.")) for n in names), names[:5]
    if mode == "full":
        assert any(n.startswith("vace_patch_embedding.") for n in names)
    else:
        assert all(".lora_" in n for n in names)
    before = {k: v.clone() for k, v in run.task.models["dit"].state_dict().items() if ".lora_" not in k}
    state = train(config)
    assert state.step == 2
    if mode == "lora":
        from safetensors.torch import load_file

        saved = load_file(str(next((tmp_path / "out").glob("*.safetensors"))))
        assert saved and all(k.startswith("vace_blocks.") for k in saved), list(saved)[:3]
    else:
        saved = (tmp_path / "out").glob("*/dit/diffusion_pytorch_model.safetensors")
        from safetensors.torch import load_file

        weights = load_file(str(next(saved)))
        moved = {k for k, v in before.items() if not torch.equal(weights[k], v)}
        assert moved and all(k.startswith(("vace_blocks.", "vace_patch_embedding.")) for k in moved), sorted(moved)


@pytest.mark.integration
def test_trainer_refuses_parts_a_model_does_not_have(tiny_repo, vace_repo, tmp_path):
    testing = pytest.importorskip("diffsynth.training.testing")
    from diffsynth.training.trainer import setup

    dataset = vace_dataset(tmp_path / "data")
    common = dict(num_frames=5, max_pixels=32 * 32, bucket_step=32, data_file_keys=["video"])
    with pytest.raises(ConfigError, match="only the denoiser"):
        setup(testing.tiny_config(tiny_repo, "wan", dataset, tmp_path / "a", lora_base_model="vace", **common))
    with pytest.raises(ConfigError, match="both the denoiser"):
        setup(
            testing.tiny_config(vace_repo, "wan", dataset, tmp_path / "b", trainable_models=["dit", "vace"], **common)
        )


@pytest.mark.parity
def test_two_expert_pipeline_matches_diffusers(tiny_repo_factory, monkeypatch):
    """Wan2.2-VACE-Fun-A14B: each expert has its own control branch; diffusers' `WanVACEPipeline` with
    `transformer_2` and `boundary_ratio` hands over at the same step."""
    repo = tiny_repo_factory("vace_a14b")
    ours = P.load(repo)
    assert ours.dit2 is not None and ours.dit2.config.vace_layers
    folders = [repo / "high_noise_model", repo / "low_noise_model"]
    ref, sigmas = diffusers_vace_pipe(folders, ours, monkeypatch, repo)
    assert 0 < int((sigmas * 1000 >= 875).sum()) < 4  # both experts run
    video, masks = control()
    noise = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(14))
    expected = ref(
        prompt=P.PROMPT, negative_prompt="bad quality", video=video, mask=masks, guidance_scale=4.0,
        guidance_scale_2=3.0, num_inference_steps=4, latents=noise.clone(), **P.PARITY,
    ).frames  # fmt: skip
    got = ours(
        P.PROMPT, negative_prompt="bad quality", vace_video=video, vace_video_mask=masks, cfg_scale=4.0,
        cfg_scale_2=3.0, switch_DiT_boundary=0.875, sigmas=sigmas, latents=noise.clone(), tiled=False,
        progress_bar=False, **P.PARITY,
    )  # fmt: skip
    assert np.abs(got - expected).max() <= 1e-4

"""`diffsynth generate` with a local Qwen-Image folder and through the preset name, offline."""

import functools
import json
import shutil

import numpy as np
from PIL import Image

from diffsynth.qwen_image import QwenImagePipeline
from diffsynth.runtime.cli import main

FAST = ["--height", "32", "--width", "32", "--steps", "2", "--device", "cpu", "--dtype", "float32"]


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_generate_from_a_folder_matches_the_python_api(tiny_repo, tmp_path):
    out = tmp_path / "cli.png"
    args = ["generate", "--model", str(tiny_repo), "--prompt", "a red circle", "--seed", "3", "--output", str(out)]
    assert main([*args, *FAST]) == 0
    pipe = QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    image = pipe("a red circle", seed=3, height=32, width=32, num_inference_steps=2, progress_bar=False)
    assert np.array_equal(pixels(out), np.asarray(image))


def test_preset_name_resolves_offline_from_the_model_base_path(tiny_repo, tmp_path, monkeypatch):
    """`--model Qwen/Qwen-Image` through the preset: files found under DIFFSYNTH_MODEL_BASE_PATH."""
    base = tmp_path / "models"
    shutil.copytree(tiny_repo, base / "Qwen" / "Qwen-Image")
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    out = tmp_path / "qwen.png"
    args = ["generate", "--model", "Qwen/Qwen-Image", "--prompt", "a red circle", "--output", str(out)]
    assert main([*args, *FAST]) == 0
    assert pixels(out).shape == (32, 32, 3)


def test_controlnet_flags_match_the_python_api(tiny_repo, tmp_path):
    """`--controlnet` loads a net (an InstantX one, or a Blockwise one into its own slot) and `--control-image
    IMAGE:SCALE` becomes its `ControlNetInput`: the image equals the Python API's with the same net and input."""
    from safetensors.torch import save_file

    from diffsynth.qwen_image.blockwise_controlnet import BlockwiseControlNetConfig, QwenImageBlockwiseControlNet
    from diffsynth.qwen_image.controlnet import QwenImageControlNet, QwenImageControlNetConfig
    from diffsynth.runtime.controlnet import ControlNetInput
    from diffsynth.runtime.testing.weights import random_weights

    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    instantx = QwenImageControlNetConfig(
        num_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6)
    )
    nets = {
        "instantx": random_weights(QwenImageControlNet(instantx), 5, scale=0.2),
        "blockwise": random_weights(QwenImageBlockwiseControlNet(BlockwiseControlNetConfig(2, 64, 32)), 6, scale=0.2),
    }
    for name, net in nets.items():
        (tmp_path / name).mkdir()
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / name / "model.safetensors"))
        if name == "instantx":  # the RoPE axes are not in the shapes: diffusers' config.json beside the file
            (tmp_path / name / "config.json").write_text(json.dumps({"axes_dims_rope": [4, 6, 6]}))
        out = tmp_path / f"{name}.png"
        args = ["generate", "--model", str(tiny_repo), "--prompt", "a red circle", "--seed", "3", "--output", str(out)]
        args += ["--controlnet", str(tmp_path / name), "--control-image", f"{tmp_path / 'c.png'}:0.8"]
        assert main([*args, *FAST]) == 0
        pipe = QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
        pipe.load_controlnet(str(tmp_path / name))
        key = "blockwise_controlnet_inputs" if name == "blockwise" else "controlnet_inputs"
        control = {key: [ControlNetInput(image=str(tmp_path / "c.png"), scale=0.8)]}
        image = pipe("a red circle", seed=3, height=32, width=32, num_inference_steps=2, progress_bar=False, **control)
        plain = pipe("a red circle", seed=3, height=32, width=32, num_inference_steps=2, progress_bar=False)
        assert np.array_equal(pixels(out), np.asarray(image)) and not np.array_equal(pixels(out), np.asarray(plain))


def test_control_image_without_a_controlnet_is_refused(tiny_repo, tmp_path, capsys):
    args = ["generate", "--model", str(tiny_repo), "--prompt", "a red circle", "--output", str(tmp_path / "x.png")]
    assert main([*args, "--control-image", "c.png", *FAST]) == 2
    assert "--control-image needs a ControlNet" in capsys.readouterr().err


def test_edit_image_flag_matches_the_python_api(tiny_repo, tmp_path, monkeypatch):
    """`--edit-image` (repeatable) becomes `edit_image=[...]` in the order given; the image equals the Python API's."""
    from diffsynth.qwen_image import pipeline as qwen_pipeline

    monkeypatch.setattr(qwen_pipeline, "EDIT_AREA", 32 * 32)  # edit images at 32x32, not 1024x1024: fast
    rng = np.random.default_rng(2)
    paths = [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    given = []
    call = QwenImagePipeline.__call__

    @functools.wraps(call)  # the CLI reads the accepted arguments from the signature
    def spy(self, *args, **kwargs):
        given.append(kwargs.get("edit_image"))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(QwenImagePipeline, "__call__", spy)
    out = tmp_path / "edit.png"
    args = ["generate", "--model", str(tiny_repo), "--prompt", "swap them", "--seed", "3", "--output", str(out)]
    assert main([*args, "--edit-image", paths[0], "--edit-image", paths[1], *FAST]) == 0
    assert given == [paths]
    pipe = QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    image = pipe("swap them", edit_image=paths, seed=3, height=32, width=32, num_inference_steps=2, progress_bar=False)
    assert np.array_equal(pixels(out), np.asarray(image))


def test_inpaint_mask_flag_matches_the_python_api(tiny_repo, tmp_path):
    """`--input-image` + `--inpaint-mask` (white = repaint) become `input_image` / `inpaint_mask`."""
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, 16:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "inpaint.png"
    args = ["generate", "--model", str(tiny_repo), "--prompt", "a red circle", "--seed", "3", "--output", str(out)]
    args += ["--input-image", str(tmp_path / "in.png"), "--inpaint-mask", str(tmp_path / "mask.png")]
    assert main([*args, *FAST]) == 0
    pipe = QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    image = pipe("a red circle", input_image=str(tmp_path / "in.png"), inpaint_mask=Image.fromarray(mask), seed=3,
                 height=32, width=32, num_inference_steps=2, progress_bar=False)  # fmt: skip
    assert np.array_equal(pixels(out), np.asarray(image))


def _hub_with_lora(tiny_repo, tmp_path, monkeypatch, random_lora, lora_repo: str) -> tuple:
    """Qwen/Qwen-Image (the tiny repo) and a random LoRA for its DiT as `lora_repo/model.safetensors`, both under
    the model base path with downloads off; returns the LoRA file."""
    from safetensors.torch import save_file

    base = tmp_path / "models"
    shutil.copytree(tiny_repo, base / "Qwen" / "Qwen-Image")
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    dit = QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu").dit
    lora = base / lora_repo / "model.safetensors"
    lora.parent.mkdir(parents=True)
    save_file(random_lora(dit, "diffusion_model", seed=11), str(lora))
    return lora


def test_a_lora_preset_is_its_base_with_the_lora(tiny_repo, tmp_path, monkeypatch, random_lora):
    """`DiffSynth-Studio/Qwen-Image-Distill-LoRA` loads Qwen-Image's files, applies the repo's LoRA and samples
    with its settings (no CFG): the image equals the base pipeline's with `load_lora(file)` and those settings."""
    lora = _hub_with_lora(tiny_repo, tmp_path, monkeypatch, random_lora, "DiffSynth-Studio/Qwen-Image-Distill-LoRA")
    preset = QwenImagePipeline.from_pretrained(
        "DiffSynth-Studio/Qwen-Image-Distill-LoRA", torch_dtype="float32", device="cpu"
    )
    assert preset.defaults["cfg_scale"] == 1.0 and preset.defaults["num_inference_steps"] == 15
    run = functools.partial(preset, "a red circle", seed=3, height=32, width=32, num_inference_steps=2)
    image = np.asarray(run(progress_bar=False))
    base = QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    kwargs = dict(seed=3, height=32, width=32, num_inference_steps=2, cfg_scale=1.0, progress_bar=False)
    plain = np.asarray(base("a red circle", **kwargs))
    base.load_lora(str(lora))
    assert np.array_equal(image, np.asarray(base("a red circle", **kwargs))) and not np.array_equal(image, plain)


def test_the_dmd2_preset_reads_peft_keys_and_fixes_mu(tiny_repo, tmp_path, monkeypatch, random_lora):
    """`MusePublic/Qwen-Image-Distill` (peft keys under `base_model.model.`, as DiffSynth-Studio's DMD2 example strips
    them) equals the base with that LoRA, no CFG and mu ln 2.5; the mu is what sets it apart from the model's own."""
    import math

    from safetensors.torch import save_file

    _hub_with_lora(tiny_repo, tmp_path, monkeypatch, random_lora, "Other/Unused")
    dit = QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu").dit
    state = {f"base_model.model.{k.removeprefix('transformer.')}": v for k, v in random_lora(dit, "peft").items()}
    lora = tmp_path / "models" / "MusePublic" / "Qwen-Image-Distill" / "qwen_image_distill_3step.safetensors"
    lora.parent.mkdir(parents=True)
    save_file(state, str(lora))
    preset = QwenImagePipeline.from_pretrained("MusePublic/Qwen-Image-Distill", torch_dtype="float32", device="cpu")
    kwargs = dict(seed=3, height=32, width=32, num_inference_steps=3, progress_bar=False)  # 2: both end at 0.02
    image = np.asarray(preset("a red circle", **kwargs))
    base = QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    base.load_lora(str(lora))
    same = np.asarray(base("a red circle", cfg_scale=1.0, exponential_shift_mu=math.log(2.5), **kwargs))
    own_mu = np.asarray(base("a red circle", cfg_scale=1.0, **kwargs))
    assert np.array_equal(image, same) and not np.array_equal(image, own_mu)


def test_cli_lora_by_hub_name_matches_the_python_api(tiny_repo, tmp_path, monkeypatch, random_lora):
    """`--lora Org/Name:SCALE` fetches (here: finds) the repo's one LoRA file and applies it at that scale."""
    lora = _hub_with_lora(tiny_repo, tmp_path, monkeypatch, random_lora, "Org/Style")
    out = tmp_path / "lora.png"
    args = ["generate", "--model", str(tiny_repo), "--prompt", "a red circle", "--seed", "3", "--output", str(out)]
    assert main([*args, "--lora", "Org/Style:0.5", *FAST]) == 0
    pipe = QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    pipe.load_lora(str(lora), scale=0.5)
    image = pipe("a red circle", seed=3, height=32, width=32, num_inference_steps=2, progress_bar=False)
    assert np.array_equal(pixels(out), np.asarray(image))

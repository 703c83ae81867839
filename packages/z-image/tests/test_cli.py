"""`diffsynth generate` with a local Z-Image folder, and LoRA through the pipeline."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.runtime.cli import main
from diffsynth.runtime.errors import LoRAError
from diffsynth.runtime.lora import LoRATarget, LoRAWeights, save_lora
from diffsynth.z_image import ZImagePipeline


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


FAST = ["--height", "64", "--width", "64", "--steps", "2", "--device", "cpu", "--dtype", "float32"]


def test_generate_writes_the_image(tiny_repo, tmp_path):
    out = tmp_path / "out" / "circle.png"
    code = main(["generate", "--model", str(tiny_repo), "--prompt", "a red circle", "--output", str(out), *FAST])
    assert code == 0
    assert pixels(out).shape == (64, 64, 3)


def test_generate_matches_the_python_api(tiny_repo, tmp_path):
    out = tmp_path / "cli.png"
    main(
        ["generate", "--model", str(tiny_repo), "--prompt", "a red circle", "--seed", "3", "--output", str(out), *FAST]
    )
    pipe = ZImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    image = pipe("a red circle", seed=3, height=64, width=64, num_inference_steps=2, progress_bar=False)
    assert np.array_equal(pixels(out), np.asarray(image))


def _tiny_lora(pipe, rank=2):
    g = torch.Generator().manual_seed(4)
    targets = {}
    for name in ["layers.0.attention.to_q", "layers.1.feed_forward.w1"]:
        weight = pipe.dit.get_submodule(name).weight
        targets[name] = LoRATarget(
            down=torch.randn(rank, weight.shape[1], generator=g), up=torch.randn(weight.shape[0], rank, generator=g)
        )
    return LoRAWeights(targets)


def test_lora_flag_changes_the_image_and_kohya_file_loads(tiny_repo, tmp_path):
    pipe = ZImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    path = tmp_path / "style.safetensors"
    save_lora(_tiny_lora(pipe), path, format="kohya")
    plain, styled = tmp_path / "plain.png", tmp_path / "styled.png"
    assert main(["generate", "--model", str(tiny_repo), "--prompt", "a cat", "--output", str(plain), *FAST]) == 0
    args = ["generate", "--model", str(tiny_repo), "--prompt", "a cat", "--output", str(styled), "--lora"]
    assert main([*args, f"{path}:0.5", *FAST]) == 0
    assert not np.array_equal(pixels(plain), pixels(styled))


def test_unfused_lora_can_be_cleared(tiny_repo, tmp_path):
    pipe = ZImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    path = tmp_path / "style.safetensors"
    save_lora(_tiny_lora(pipe), path, format="peft")
    kwargs = dict(seed=0, height=64, width=64, num_inference_steps=2, output_type="pt", progress_bar=False)
    before = pipe("a cat", **kwargs)
    pipe.load_lora(str(path), scale=0.7, fuse=False)
    styled = pipe("a cat", **kwargs)
    pipe.clear_loras()
    after = pipe("a cat", **kwargs)
    assert (styled - before).abs().max() > 1e-3
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_lora_for_another_model_is_refused(tiny_repo, tmp_path):
    pipe = ZImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    foreign = LoRAWeights({"double_blocks.0.img_attn.qkv": LoRATarget(down=torch.zeros(2, 8), up=torch.zeros(24, 2))})
    path = tmp_path / "flux_lora.safetensors"
    save_lora(foreign, path, format="peft")
    with pytest.raises(LoRAError, match="double_blocks"):
        pipe.load_lora(str(path))
    with pytest.raises(LoRAError, match="missing.safetensors"):
        pipe.load_lora(str(tmp_path / "missing.safetensors"))


def test_preset_name_resolves_offline_from_the_model_base_path(tiny_repo, tmp_path, monkeypatch):
    """`--model Tongyi-MAI/Z-Image-Turbo` through the preset: files found under DIFFSYNTH_MODEL_BASE_PATH."""
    import shutil

    base = tmp_path / "models"
    shutil.copytree(tiny_repo, base / "Tongyi-MAI" / "Z-Image-Turbo")
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    out = tmp_path / "turbo.png"
    args = ["generate", "--model", "Tongyi-MAI/Z-Image-Turbo", "--prompt", "a red circle", "--output", str(out)]
    assert main([*args, *FAST]) == 0
    assert pixels(out).shape == (64, 64, 3)


def test_video_only_flag_is_refused_for_an_image_model(tiny_repo, tmp_path, capsys):
    args = ["generate", "--model", str(tiny_repo), "--prompt", "a cat", "--output", str(tmp_path / "x.png")]
    assert main([*args, "--num-frames", "9", *FAST]) == 2
    assert "--num-frames is not used by ZImagePipeline" in capsys.readouterr().err


def test_generate_with_the_first_block_cache(tiny_repo, tmp_path, caplog):
    """Threshold 0 reuses nothing: the image equals the uncached one, and the log says how much was reused."""
    out, cached = tmp_path / "plain.png", tmp_path / "cached.png"
    main(["generate", "--model", str(tiny_repo), "--prompt", "a red circle", "--output", str(out), *FAST])
    with caplog.at_level("INFO", logger="diffsynth"):
        args = ["--prompt", "a red circle", "--first-block-cache", "0", "--output", str(cached)]
        main(["generate", "--model", str(tiny_repo), *args, *FAST])
    assert np.array_equal(pixels(out), pixels(cached))
    assert "first-block cache (dit): 0 of 2 model calls reused" in caplog.text


def test_positive_only_lora_flag_matches_the_python_api(tiny_repo, tmp_path):
    """`--positive-only-lora FILE` is `positive_only_lora=FILE`: the LoRA acts on the conditional branch only."""
    pipe = ZImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    path = tmp_path / "i2l.safetensors"
    save_lora(_tiny_lora(pipe), path)
    out = tmp_path / "positive.png"
    args = ["generate", "--model", str(tiny_repo), "--prompt", "a cat", "--negative-prompt", "blurry", "--cfg", "3"]
    assert main([*args, "--seed", "3", "--output", str(out), "--positive-only-lora", str(path), *FAST]) == 0
    call = dict(negative_prompt="blurry", cfg_scale=3.0, seed=3, height=64, width=64, num_inference_steps=2)
    image = pipe("a cat", positive_only_lora=str(path), progress_bar=False, **call)
    assert np.array_equal(pixels(out), np.asarray(image))
    pipe.load_lora(str(path))  # on both branches: another image
    assert not np.array_equal(pixels(out), np.asarray(pipe("a cat", progress_bar=False, **call)))

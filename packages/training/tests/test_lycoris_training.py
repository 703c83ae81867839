"""`--lora_type dora` / `loha` / `lokr`: DoRA and LyCORIS adapters trained on the tiny Z-Image repo, saved in the
keys LyCORIS and ComfyUI read, and applied by the pipeline exactly as they were trained.

Integration: needs diffsynth-z-image installed (the `integration` nox session installs every package).
"""

import math

import pytest

pytest.importorskip("diffsynth.z_image")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from diffsynth.runtime.errors import ConfigError  # noqa: E402
from diffsynth.training.data import batch_plan  # noqa: E402
from diffsynth.training.testing import first_losses, tiny_config  # noqa: E402
from diffsynth.training.trainer import TrainState, save, setup, train_step  # noqa: E402
from diffsynth.z_image import ZImagePipeline  # noqa: E402
from diffsynth.z_image.pipeline import z_image_velocity  # noqa: E402

pytestmark = pytest.mark.integration


def config(repo, data, output, **overrides):
    return tiny_config(repo, "z_image", data, output, **{"learning_rate": 1e-3, **overrides})


@pytest.mark.parametrize(
    ("lora_type", "settings", "fields"),
    [
        ("loha", {}, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}),
        ("lokr", {}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}),  # rank-4 pairs (full w2 on narrow layers)
        ("lokr", {"lora_rank": 64, "lora_alpha": 8.0}, {"lokr_w1", "lokr_w2"}),  # two full factors, scale 8 / 64
        ("dora", {"lora_alpha": 8.0}, {"weight", "dora_scale"}),  # lora_A.weight / lora_B.weight + magnitudes
    ],
)
def test_lycoris_training_gives_a_file_the_pipeline_applies_exactly(
    z_image_repo, z_image_dataset, tmp_path, lora_type, settings, fields
):
    out = tmp_path / "out"
    run = setup(
        config(z_image_repo, z_image_dataset, out, lora_type=lora_type, lora_formats=["diffsynth", "kohya"], **settings)
    )
    tag = {"loha": ".hada_", "lokr": ".lokr_", "dora": ".lora_"}[lora_type]
    assert run.trainable and all(tag in name for name in run.trainable)
    state = TrainState()
    for batch in batch_plan(run.dataset.batch_keys, batch_size=2):
        state = train_step(run, state, [[run.dataset[i] for i in batch]])
        assert math.isfinite(state.loss) and state.loss > 0
    save(run, state)

    saved = load_file(out / "step-000002.safetensors")
    found = {key.rsplit(".", 1)[1] for key in saved}
    assert fields <= found <= fields | ({"lokr_w2"} if "lokr_w2_a" in fields else set())
    assert all(key.startswith("lora_unet_") for key in load_file(out / "step-000002.kohya.safetensors"))

    pipe = ZImagePipeline.from_pretrained(str(z_image_repo), torch_dtype="float32", device="cpu")
    g = torch.Generator().manual_seed(3)
    latents, sigma = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([0.7])
    text = pipe.encode_prompt(["a red circle on a blue background"])
    with torch.no_grad():
        trained = z_image_velocity(run.model, latents, sigma, text)
        base = z_image_velocity(pipe.dit, latents, sigma, text)
        assert (trained - base).abs().max() > 1e-4  # the adapter learned something
        for suffix in ("", ".kohya"):
            pipe.load_lora(out / f"step-000002{suffix}.safetensors", fuse=False, name="trained")
            got = z_image_velocity(pipe.dit, latents, sigma, text)
            torch.testing.assert_close(got, trained, atol=1e-5, rtol=1e-5)
        pipe.clear_loras()
        pipe.load_lora(out / "step-000002.safetensors")  # fused
        torch.testing.assert_close(z_image_velocity(pipe.dit, latents, sigma, text), trained, atol=1e-5, rtol=1e-5)


def test_lycoris_flags_that_do_not_fit_are_named(z_image_repo, z_image_dataset, tmp_path):
    with pytest.raises(ConfigError, match="--lora_type 'ia3': choose from lora, dora, loha, lokr"):
        config(z_image_repo, z_image_dataset, tmp_path, lora_type="ia3").check()
    with pytest.raises(ConfigError, match="--lora_type lokr is an adapter; --trainable_models"):
        config(z_image_repo, z_image_dataset, tmp_path, lora_type="lokr", trainable_models=["dit"]).check()
    with pytest.raises(ConfigError, match="--lora_type loha: --lora_checkpoint starts down/up"):
        config(z_image_repo, z_image_dataset, tmp_path, lora_type="loha", lora_checkpoint="x.safetensors").check()
    with pytest.raises(ConfigError, match="--lokr_factor 0 must be"):
        config(z_image_repo, z_image_dataset, tmp_path, lora_type="lokr", lokr_factor=0).check()


def test_lycoris_on_a_4bit_model_is_refused_by_layer(z_image_repo, z_image_dataset, tmp_path):
    pytest.importorskip("bitsandbytes")
    with pytest.raises(ConfigError, match=r"--lora_type lokr: \S+ is a quantized layer \(--quantize\)"):
        setup(config(z_image_repo, z_image_dataset, tmp_path, lora_type="lokr", quantize=["dit=bitsandbytes_nf4"]))


@pytest.mark.parametrize("lora_type", ["dora", "loha", "lokr"])
def test_lycoris_on_a_streamed_base_trains_exactly_as_on_a_resident_one(
    z_image_repo, z_image_dataset, tmp_path, lora_type
):
    """The VRAM manager may stream the base blocks under peft's LyCORIS layers (they read only the base weight's
    shape) and DoRA layers (they read the weight inside the forward, where the streamed block is present)."""
    plain, resident = first_losses(config(z_image_repo, z_image_dataset, tmp_path / "plain", lora_type=lora_type))
    streamed, run = first_losses(
        config(z_image_repo, z_image_dataset, tmp_path / "off", lora_type=lora_type, offload_models=["dit"])
    )
    from diffsynth.runtime.vram import vram_handle

    handle = vram_handle(run.task.models["dit"])
    assert handle is not None and handle.plan.streamed and not handle.plan.resident
    assert streamed == plain
    for name, p in run.trainable.items():
        assert torch.equal(p, resident.trainable[name]), name

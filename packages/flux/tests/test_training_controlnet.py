"""FLUX.1 ControlNet training: the control condition is the one the pipeline's `prepare_controls` encodes, the task's
velocity is the pipeline's per-step call with the net's residuals, and the trainer trains the net itself
(`--trainable_models controlnet`, the DiT frozen) or a DiT LoRA under the frozen net.

The nets are small FLUX.1 ControlNets of the tiny repo's DiT widths (a Union net with 4 modes and an alimama-style
inpainting net, 68 condition features), written as diffusers folders; the repo is conftest's at 32 T5 tokens.
The trainer tests are `integration` (they need diffsynth-training installed).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffsynth_flux_test_helpers import make_controlnet, random_image, repo_controlnet_config, write_controlnet_folder
from PIL import Image
from safetensors.torch import load_file

from diffsynth.flux.flux1.controlnet_formats import ours_to_diffusers
from diffsynth.flux.pipeline import ControlCondition, FluxImagePipeline
from diffsynth.flux.training import FluxTrainingTask
from diffsynth.runtime.controlnet import ControlNetInput
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import pil_to_tensor, tensor_to_pil
from diffsynth.runtime.pipeline import configs_from_folder

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle on a blue background", "a small green square in the top left corner"]
MODES = ["depth", "1"]  # a name and a CSV cell's index (tile)
T5_TOKENS = 32
SIZE = 64


@pytest.fixture(scope="module")
def repo(tiny_repo, tmp_path_factory) -> Path:
    """The tiny FLUX.1 repo at 32 T5 tokens (the pipeline and the task both read the setting)."""
    root = shutil.copytree(tiny_repo, tmp_path_factory.mktemp("cn-train") / "repo")
    (root / "diffsynth.json").write_text(json.dumps({"defaults": {"t5_sequence_length": T5_TOKENS}}))
    return root


def small_residuals(net):
    """The randomised net with its zero-initialised output layers scaled down, so its residuals are of the size of
    the DiT's hidden states (as a trained net's) rather than swamping them."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_blocks.", "controlnet_single_blocks.")):
                p.mul_(0.02)
    return net


@pytest.fixture(scope="module")
def nets(tiny_configs, tmp_path_factory) -> dict[str, Path]:
    """A Union net (4 modes) and an inpainting net, randomised (their zero-initialised outputs too)."""
    dit = tiny_configs["dit"]
    root = tmp_path_factory.mktemp("cn-nets")
    union = small_residuals(make_controlnet(repo_controlnet_config(dit, num_modes=4, depth_single_blocks=2), seed=3))
    inpaint = small_residuals(make_controlnet(repo_controlnet_config(dit, cond_in_channels=68), seed=4))
    return {
        "union": write_controlnet_folder(root / "union", union, None) / "diffusion_pytorch_model.safetensors",
        "inpaint": write_controlnet_folder(root / "inpaint", inpaint, None) / "diffusion_pytorch_model.safetensors",
    }


def load_task(repo, net=None, **kwargs) -> FluxTrainingTask:
    configs, tokenizer = configs_from_folder(repo)
    configs += [ModelConfig(path=str(net))] if net is not None else []
    return FluxTrainingTask.from_pretrained(
        configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu", **kwargs
    )


def load_pipe(repo, net=None) -> FluxImagePipeline:
    return FluxImagePipeline.from_pretrained(
        str(repo), torch_dtype="float32", device="cpu", controlnet=None if net is None else str(net)
    )


@pytest.fixture(scope="module")
def union_task(repo, nets):
    return load_task(repo, nets["union"])


@pytest.fixture(scope="module")
def union_pipe(repo, nets):
    return load_pipe(repo, nets["union"])


@pytest.fixture(scope="module")
def inpaint_task(repo, nets):
    return load_task(repo, nets["inpaint"])


@pytest.fixture(scope="module")
def inpaint_pipe(repo, nets):
    return load_pipe(repo, nets["inpaint"])


def tensor(picture: Image.Image) -> torch.Tensor:
    """A picture as the dataset reads it: RGB [3, H, W] in [-1, 1]."""
    return pil_to_tensor(picture.convert("RGB"))[0]


def mask_picture(width: int, height: int, seed: int) -> Image.Image:
    """A blocky mask (white = repaint) with soft values, so the pipeline's 0.5 binarisation matters."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (height // 8, width // 8), dtype=np.uint8)
    return Image.fromarray(np.kron(blocks, np.ones((8, 8), dtype=np.uint8)), mode="L")


def rows(kind: str = "union", seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, prompt in enumerate(PROMPTS):
        row = {
            "prompt": prompt,
            "image": torch.rand(3, SIZE, SIZE, generator=g) * 2 - 1,
            "controlnet_image": tensor(random_image(SIZE, SIZE, seed=seed + 30 + i)),
        }
        if kind == "union":
            row["controlnet_processor_id"] = MODES[i]
        else:
            row["controlnet_inpaint_mask"] = tensor(mask_picture(SIZE, SIZE, seed=seed + 40 + i))
        out.append(row)
    return out


def pipeline_control(pipe, row, height=SIZE, width=SIZE) -> ControlCondition:
    """What the pipeline prepares for one call given the row's pictures as PIL and its mode, at the target size."""
    mask = row.get("controlnet_inpaint_mask")
    item = ControlNetInput(
        image=tensor_to_pil(row["controlnet_image"])[0],
        processor_id=row.get("controlnet_processor_id"),
        inpaint_mask=None if mask is None else tensor_to_pil(mask)[0],
    )
    return pipe.prepare_controls([item], height, width)[0]


# ------------------------------------------------------------------ encodings
def test_union_rows_are_encoded_as_the_pipeline_prepares_them(union_task, union_pipe, repo, nets):
    assert union_task.validation_references == "required" and union_task.denoiser_slot == "dit"
    assert set(union_task.models) == {"dit", "vae", "text_encoder_1", "text_encoder_2", "controlnet"}
    assert union_task.models["controlnet"] is union_task.pipe.controlnets()[0]  # the net, not the pipeline's slot
    data = rows()
    samples = union_task.encode(data)
    for row, sample in zip(data, samples, strict=True):
        control = pipeline_control(union_pipe, {**row, **_pipeline_mode(row)})
        assert sample["controlnet"].shape == ((SIZE // 16) ** 2, 64) and sample["controlnet"].dtype == torch.float32
        assert torch.equal(sample["controlnet"], control.tokens[0])
        assert sample["controlnet_mode"].tolist() == [control.mode]
    assert [s["controlnet_mode"].item() for s in samples] == [2, 1]  # depth, tile
    # a PIL picture of another size is resized to the target's, as the pipeline resizes it
    picture = random_image(48, 80, seed=3)
    row = {**data[0], "controlnet_image": picture}
    expected = union_pipe.prepare_controls([ControlNetInput(image=picture, processor_id="depth")], SIZE, SIZE)[0]
    assert torch.equal(union_task.encode([row])[0]["controlnet"], expected.tokens[0])
    # the encoding stage of a cached run loads no net: the header's config gives the same samples
    encoder_side = load_task(repo, nets["union"], denoiser=False)
    assert encoder_side.pipe.controlnet is None and encoder_side.pipe.dit is None
    again = encoder_side.encode(data)
    for ours, theirs in zip(again, samples, strict=True):
        assert torch.equal(ours["controlnet"], theirs["controlnet"])
        assert torch.equal(ours["controlnet_mode"], theirs["controlnet_mode"])


def _pipeline_mode(row) -> dict:
    """The row's mode as a user passes it to the pipeline (a CSV cell's digits are an index)."""
    value = row.get("controlnet_processor_id")
    return {} if value is None else {"controlnet_processor_id": int(value) if value.isdigit() else value}


def test_inpainting_rows_are_encoded_as_the_pipeline_prepares_them(inpaint_task, inpaint_pipe):
    data = rows("inpaint")
    samples = inpaint_task.encode(data)
    for row, sample in zip(data, samples, strict=True):
        assert sample["controlnet"].shape == ((SIZE // 16) ** 2, 68) and "controlnet_mode" not in sample
        assert torch.equal(sample["controlnet"], pipeline_control(inpaint_pipe, row).tokens[0])
    batch = inpaint_task.collate(samples)
    assert batch["controlnet"].shape == (2, (SIZE // 16) ** 2, 68) and "controlnet_mode" not in batch


# ------------------------------------------------------------------ the model call
@pytest.mark.parametrize("kind", ["union", "inpaint"])
def test_velocity_is_the_pipeline_per_step_call_with_the_controlnet(kind, request):
    """The task's velocity is bit-equal to the pipeline's `predict` (its denoise loop's call) at embedded guidance 1
    with the ControlNet conditions `prepare_controls` gives for the rows (their tokens and modes side by side), and
    equal row by row to one-prompt calls up to batching's float32 rounding; the same when the net is the model the
    trainer trains (`trained_model="controlnet"`); another control image gives another prediction."""
    task = request.getfixturevalue(f"{kind}_task")
    pipe = request.getfixturevalue(f"{kind}_pipe")
    data = rows(kind)
    batch = task.collate(task.encode(data))
    noisy = torch.randn(2, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.75, 0.3])
    text = pipe.encode_prompt(PROMPTS, T5_TOKENS)
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], batch, noisy, sigma)
        controls = [pipeline_control(pipe, {**row, **_pipeline_mode(row)}) for row in data]
        modes = None if controls[0].mode is None else torch.tensor([c.mode for c in controls])
        both = ControlCondition(controls[0].model, torch.cat([c.tokens for c in controls]), modes)
        assert torch.equal(ours, pipe.predict(noisy, sigma, text, None, 1.0, 1.0, controls=[both]))
        worst = 0.0
        for i, control in enumerate(controls):
            prompt = type(text)(text.t5[i : i + 1], text.pooled[i : i + 1])
            theirs = pipe.predict(noisy[i : i + 1], sigma[i], prompt, None, 1.0, 1.0, controls=[control])
            worst = max(worst, (ours[i : i + 1] - theirs).abs().max().item())
        assert worst <= 1e-5, worst  # measured: about 2e-6 (a batch of two vs. one)
        trained_net = FluxTrainingTask(task.pipe, trained_model="controlnet", t5_sequence_length=T5_TOKENS)
        assert trained_net.denoiser_slot == "controlnet"
        as_net = trained_net.velocity(trained_net.models["controlnet"], batch, noisy, sigma)
        assert torch.equal(as_net, ours)
        other = task.collate(task.encode(rows(kind, seed=7)))
        other["latents"], other["t5"], other["pooled"] = batch["latents"], batch["t5"], batch["pooled"]
        assert (task.velocity(task.models["dit"], other, noisy, sigma) - ours).abs().max() > 1e-4
        plain = {k: v for k, v in batch.items() if not k.startswith("controlnet")}
        no_net = task.velocity(task.models["dit"], plain, noisy, sigma)
        assert torch.equal(no_net, pipe.predict(noisy, sigma, text, None, 1.0, 1.0))
        assert (no_net - ours).abs().max() > 1e-4
    assert ours.shape == (2, 16, SIZE // 8, SIZE // 8) and ours.dtype == torch.float32


def test_the_trained_net_gets_gradients_and_the_dit_none(union_task):
    task = FluxTrainingTask(union_task.pipe, trained_model="controlnet", t5_sequence_length=T5_TOKENS)
    net, dit = task.models["controlnet"], task.pipe.dit
    batch = task.collate(task.encode(rows()))
    noisy = torch.randn(2, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(2))
    net.requires_grad_(True)
    try:
        net.gradient_checkpointing = True
        task.velocity(net, batch, noisy, torch.tensor([0.5, 0.9])).square().mean().backward()
        assert dit.gradient_checkpointing  # forwarded to the frozen DiT
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
        assert all(p.grad is None for p in dit.parameters())
    finally:
        net.requires_grad_(False).zero_grad(set_to_none=True)
        net.gradient_checkpointing = dit.gradient_checkpointing = False


# ------------------------------------------------------------------ errors
def test_clear_errors(union_task, inpaint_task, repo, nets, tiny_pipe):
    plain = load_task(repo, encoders=True)
    with pytest.raises(ConfigError, match="row 0 of the batch .* has controlnet_image, but no FLUX.1 ControlNet"):
        plain.encode(rows())
    batch = union_task.collate(union_task.encode(rows()))
    noisy, sigma = torch.zeros(2, 16, 8, 8), torch.tensor([0.5, 0.5])
    with pytest.raises(ConfigError, match="has a ControlNet condition .* no FLUX.1 ControlNet is loaded"):
        plain.velocity(plain.models["dit"], batch, noisy, sigma)
    with pytest.raises(ConfigError, match="trained_model='controlnet' .* none is among the model files"):
        load_task(repo, trained_model="controlnet")
    with pytest.raises(ConfigError, match="trained_model='vae' is not accepted"):
        FluxTrainingTask(union_task.pipe, trained_model="vae")
    trained = FluxTrainingTask(union_task.pipe, trained_model="controlnet", t5_sequence_length=T5_TOKENS)
    no_control = [{k: v for k, v in row.items() if not k.startswith("controlnet")} for row in rows()]
    with pytest.raises(ConfigError, match="row 0 of the batch .* has no controlnet_image: training the ControlNet"):
        trained.encode(no_control)
    cached_without = union_task.collate(union_task.encode(no_control))
    with pytest.raises(ConfigError, match="training the ControlNet needs batches with controlnet_image"):
        trained.velocity(trained.models["controlnet"], cached_without, noisy, sigma)
    unknown = [{**rows()[0], "controlnet_processor_id": "openpose"}]
    with pytest.raises(ConfigError, match="controlnet_processor_id 'openpose' is not one of its modes.*canny, tile"):
        union_task.encode(unknown)
    with pytest.raises(ConfigError, match="controlnet_processor_id is missing"):
        union_task.encode([{k: v for k, v in rows()[0].items() if k != "controlnet_processor_id"}])
    with pytest.raises(ConfigError, match="'4' is not|4 is not one of its modes"):  # 4 modes: 0..3
        union_task.encode([{**rows()[0], "controlnet_processor_id": "4"}])
    with pytest.raises(ConfigError, match="has no controlnet_inpaint_mask: this ControlNet is an inpainting net"):
        inpaint_task.encode([{k: v for k, v in rows("inpaint")[0].items() if k != "controlnet_inpaint_mask"}])
    with pytest.raises(ConfigError, match="has controlnet_inpaint_mask, but this ControlNet takes no mask"):
        union_task.encode([{**rows()[0], "controlnet_inpaint_mask": rows("inpaint")[0]["controlnet_inpaint_mask"]}])
    unread = {**rows()[0], "controlnet_image": "ctrl0.png"}
    with pytest.raises(ConfigError, match="controlnet_image is the path 'ctrl0.png'.*--data_file_keys"):
        union_task.encode([unread])
    mixed = union_task.encode(rows()[:1]) + union_task.encode(no_control[:1])
    with pytest.raises(ConfigError, match="mixes 1 rows with controlnet_image and 1 without"):
        union_task.collate(mixed)
    with pytest.raises(ConfigError, match=r"\(64 features, a mode\) was encoded for another net .*encode it again"):
        inpaint_task.velocity(inpaint_task.models["dit"], batch, noisy, sigma)
    two = [ModelConfig(path=str(nets["union"])), ModelConfig(path=str(nets["inpaint"]))]
    with pytest.raises(ConfigError, match="hold 2 FLUX.1 ControlNets; training takes one at a time"):
        FluxTrainingTask.from_pretrained(configs_from_folder(repo)[0] + two, torch_dtype="float32", encoders=False)
    # validation samples: the control image (the inpainting net's mask too) and a Union net's mode
    with pytest.raises(ConfigError, match="takes one image, its control image"):
        union_task.reference_arguments([])
    with pytest.raises(ConfigError, match="validation_processor_id is missing"):
        union_task.reference_arguments([random_image(32, 32)])
    with pytest.raises(ConfigError, match="two images, the image to repaint and its mask"):
        inpaint_task.reference_arguments([random_image(32, 32)])


# ------------------------------------------------------------------ validation samples
def test_validation_samples_are_the_pipeline_with_the_control_image(union_task, union_pipe):
    task = FluxTrainingTask(union_task.pipe, t5_sequence_length=T5_TOKENS, validation_processor_id="depth")
    picture = random_image(32, 32, seed=5)
    size = {"height": 32, "width": 32, "num_inference_steps": 2}
    control = [ControlNetInput(image=picture, processor_id="depth")]
    with torch.no_grad():
        ours = task.sample(task.models["dit"], PROMPTS[:1], seed=3, references=[[picture]], **size)[0]
        theirs = union_pipe(PROMPTS[0], seed=3, progress_bar=False, controlnet_inputs=control, **size)
        trained = FluxTrainingTask(union_task.pipe, trained_model="controlnet", validation_processor_id=2)
        as_net = trained.sample(trained.models["controlnet"], PROMPTS[:1], seed=3, references=[[picture]], **size)[0]
    assert ours.size == (32, 32)
    assert np.abs(np.asarray(ours, dtype=int) - np.asarray(theirs, dtype=int)).max() <= 1
    assert np.array_equal(np.asarray(as_net), np.asarray(ours))


# ------------------------------------------------------------------ the trainer
def write_dataset(folder: Path, kind: str = "union") -> Path:
    """Two 64x64 noise pictures with their control images (and masks, or modes) as files beside them."""
    testing = pytest.importorskip("diffsynth.training.testing")
    folder.mkdir(parents=True, exist_ok=True)
    extra = []
    for i in range(len(PROMPTS)):
        random_image(SIZE, SIZE, seed=60 + i).save(folder / f"ctrl{i}.png")
        item = {"controlnet_image": f"ctrl{i}.png"}
        if kind == "union":
            item["controlnet_processor_id"] = MODES[i]
        else:
            mask_picture(SIZE, SIZE, seed=70 + i).save(folder / f"mask{i}.png")
            item["controlnet_inpaint_mask"] = f"mask{i}.png"
        extra.append(item)
    return testing.write_caption_dataset(folder, PROMPTS, extra=extra)


FILE_KEYS = {"union": "image,controlnet_image", "inpaint": "image,controlnet_image,controlnet_inpaint_mask"}


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["union", "inpaint"])
def test_trainable_models_controlnet_trains_the_net_and_saves_a_file_the_pipeline_loads(kind, repo, nets, tmp_path):
    """Through the trainer's API with `--trainable_models controlnet`: two steps change the net's weights and not
    the DiT's; the saved file loads strictly into the pipeline as a net equal to the trained one."""
    from diffsynth.training.testing import tiny_config
    from diffsynth.training.trainer import TrainState, save, setup, train_step

    dataset = write_dataset(tmp_path / "data", kind)
    options = dict(
        data_file_keys=FILE_KEYS[kind].split(","),
        model_paths=[str(nets[kind])],
        trainable_models=["controlnet"],
        learning_rate=1e-3,
        seed=0,
    )
    run = setup(tiny_config(repo, "flux", dataset, tmp_path / "out", **options))
    task = run.task
    net, dit = task.models["controlnet"], task.pipe.dit
    assert task.trained_model == "controlnet" and task.denoiser_slot == "controlnet"
    assert set(run.trainable) == {name for name, _ in net.named_parameters()}
    net_before = {k: v.clone() for k, v in net.state_dict().items()}
    dit_before = {k: v.clone() for k, v in dit.state_dict().items()}
    items = [run.dataset[i] for i in range(len(PROMPTS))]
    assert items[0]["controlnet_image"].shape == (3, SIZE, SIZE)
    state = TrainState()
    for _ in range(2):
        state = train_step(run, state, [items])
    assert np.isfinite(state.loss) and state.loss > 0
    changed = [k for k, v in net.state_dict().items() if not torch.equal(v, net_before[k])]
    assert len(changed) > len(net_before) // 2, changed
    assert all(torch.equal(v, dit_before[k]) for k, v in dit.state_dict().items())
    save(run, state)
    folder = tmp_path / "out" / "step-000002" / "controlnet"
    saved = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    assert set(saved) == set(ours_to_diffusers(net_before))  # the hub files' (diffusers') keys
    assert "controlnet_x_embedder.weight" in saved and "x_embedder.weight" in saved
    pipe = load_pipe(repo)
    assert pipe.load_controlnet(str(folder)) == [0]  # strict load
    loaded = pipe.controlnets()[0]
    assert loaded.config == net.config
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.integration
def test_cli_trains_the_controlnet_with_validation_samples(repo, nets, tmp_path):
    """`diffsynth-train` as users type it: --model_paths with the net, --trainable_models controlnet, the
    control image as --validation_images and the Union mode as a task option; the cached two-stage run (encoded
    without the DiT and the net: the net's header says how to encode) gives the same loss."""
    testing = pytest.importorskip("diffsynth.training.testing")
    dataset = write_dataset(tmp_path / "data")
    flags = ["--data_file_keys", FILE_KEYS["union"], "--model_paths", str(nets["union"])]
    flags += ["--trainable_models", "controlnet", "--learning_rate", "1e-3", "--dataset_repeat", "2"]
    train = testing.CliTrainer(repo, "flux", dataset, *flags)
    validation = ["--validation_prompts", PROMPTS[0], "--validation_images", "ctrl1.png"]
    validation += ["--task_options", "validation_processor_id=depth"]
    validation += ["--validation_height", "32", "--validation_width", "32", "--validation_num_inference_steps", "2"]
    losses = train(tmp_path / "out", *validation)
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert (tmp_path / "out" / "validation" / "step-000002-0.png").is_file()
    assert (tmp_path / "out" / "step-000002" / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    direct, cached = train.direct_and_cached(tmp_path / "two-stage", "--max_steps", "1")
    stored = load_file(str(next((tmp_path / "two-stage" / "cache").rglob("*.safetensors"))))
    assert stored["controlnet"].shape == ((SIZE // 16) ** 2, 64) and stored["controlnet_mode"].numel() == 1
    assert cached[0] == pytest.approx(direct[0], rel=1e-6, abs=1e-7)


@pytest.mark.integration
def test_a_dit_lora_trains_under_the_frozen_controlnet(repo, nets, tmp_path):
    """The default (LoRA on the DiT) with controlnet_image rows: only LoRA weights change, the net stays as it
    was, and the pipeline with the net and the saved LoRA draws something else from the same control image."""
    from diffsynth.training.testing import outputs_before_and_after_lora, tiny_config
    from diffsynth.training.trainer import TrainState, save, setup, train_step

    dataset = write_dataset(tmp_path / "data")
    options = dict(data_file_keys=FILE_KEYS["union"].split(","), model_paths=[str(nets["union"])], seed=0)
    run = setup(tiny_config(repo, "flux", dataset, tmp_path / "out", **options))
    net, dit = run.task.models["controlnet"], run.task.models["dit"]
    assert run.task.denoiser_slot == "dit" and run.trainable and all("lora_" in n for n in run.trainable)
    net_before = {k: v.clone() for k, v in net.state_dict().items()}
    dit_before = {name: p.detach().clone() for name, p in dit.named_parameters()}
    items = [run.dataset[i] for i in range(len(PROMPTS))]
    state = TrainState()
    for _ in range(2):
        state = train_step(run, state, [items])
    changed = {name for name, p in dit.named_parameters() if not torch.equal(p, dit_before[name])}
    assert changed and all("lora_" in name for name in changed)
    assert all(torch.equal(v, net_before[k]) for k, v in net.state_dict().items())
    save(run, state)
    lora = tmp_path / "out" / "step-000002.safetensors"
    pipe = load_pipe(repo, nets["union"])
    control = [ControlNetInput(image=Image.open(dataset / "ctrl0.png"), processor_id="depth")]
    call = dict(seed=0, num_inference_steps=2, output_type="pt", progress_bar=False, height=SIZE, width=SIZE)
    call["controlnet_inputs"] = control
    base, after = outputs_before_and_after_lora(pipe, lora, PROMPTS[0], **call)
    assert after.shape == base.shape == (1, 3, SIZE, SIZE)
    assert (after - base).abs().max() > 1e-5  # both calls are deterministic: any change is the LoRA's (~1e-4)

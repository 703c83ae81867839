"""ControlNet training for Qwen-Image: DiffSynth-Studio's Blockwise ControlNets (Canny / Depth / Inpaint) and the
InstantX ControlNets (Union / Inpainting).

The task's condition is the pipeline's `blockwise_controlnet_inputs` / `controlnet_inputs` condition for the same
picture, its model call the pipeline's per-step DiT + net call; the trainer (`diffsynth-train --trainable_models
blockwise_controlnet` / `controlnet`) trains the net alone and saves it in the released file's keys, which the
pipeline loads strictly; a DiT LoRA trains under the frozen net. The trainer tests are `integration`, as in
test_training.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from diffsynth.qwen_image import QwenImagePipeline
from diffsynth.qwen_image.blockwise_controlnet import (
    BlockwiseControlNetConfig,
    QwenImageBlockwiseControlNet,
    blockwise_residual,
)
from diffsynth.qwen_image.controlnet import QwenImageControlNet, QwenImageControlNetConfig
from diffsynth.qwen_image.pipeline import controlnet_residuals, pack, qwen_image_velocity
from diffsynth.qwen_image.training import QwenImageTrainingTask
from diffsynth.runtime.controlnet import ControlNetInput
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import pil_to_tensor
from diffsynth.runtime.pipeline import configs_from_folder
from diffsynth.runtime.testing.weights import random_weights

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle on a blue background", "a small green square in the top left corner"]
FAST = {"height": 64, "width": 64, "num_inference_steps": 2, "cfg_scale": 1.0, "progress_bar": False}
BLOCKWISE, CONTROLNET = "blockwise_controlnet", "controlnet"
# the tiny nets: name -> (pipeline slot, whether it inpaints)
KINDS = {
    "canny": (BLOCKWISE, False),
    "inpaint": (BLOCKWISE, True),
    "union": (CONTROLNET, False),
    "inpainting": (CONTROLNET, True),
}


def picture(seed: int, size=(64, 64)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def mask_picture() -> Image.Image:
    """White (repaint) on the right half, as an RGB file reads."""
    array = np.zeros((64, 64, 3), dtype=np.uint8)
    array[:, 32:] = 255
    return Image.fromarray(array)


def instantx_net(dit_json: dict, extra: int) -> QwenImageControlNet:
    names = ("patch_size", "in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim")
    fields = {name: dit_json[name] for name in names} | {"axes_dims_rope": tuple(dit_json["axes_dims_rope"])}
    return QwenImageControlNet(QwenImageControlNetConfig(**fields, num_layers=2, extra_condition_channels=extra))


@pytest.fixture(scope="module")
def tiny_repo(t2i_repo):
    """Qwen/Qwen-Image's layout (no Edit `processor/` folder, which would make the task Edit's)."""
    return t2i_repo


@pytest.fixture(scope="module")
def net_files(tiny_repo, tmp_path_factory):
    """Tiny nets for the tiny DiT (2 blocks of width 32) in the released layouts: DiffSynth-Studio's Blockwise
    `model.safetensors` (control-image and Inpaint, 68 condition features), and InstantX's diffusers folders
    (`diffusion_pytorch_model.safetensors` with its config.json; Union and Inpainting)."""
    root = tmp_path_factory.mktemp("controlnets")
    dit_json = json.loads((tiny_repo / "transformer" / "config.json").read_text())
    files = {}
    for seed, (name, (slot, inpaint)) in enumerate(KINDS.items()):
        folder = root / name
        folder.mkdir()
        if slot == BLOCKWISE:
            net = QwenImageBlockwiseControlNet(BlockwiseControlNetConfig(2, 68 if inpaint else 64, 32))
            files[name] = folder / "model.safetensors"
        else:
            net = instantx_net(dit_json, 4 if inpaint else 0)
            cfg = net.config
            keys = ("patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads")
            config = {name: getattr(cfg, name) for name in keys} | {
                "_class_name": "QwenImageControlNetModel",
                "joint_attention_dim": cfg.joint_attention_dim,
                "axes_dims_rope": list(cfg.axes_dims_rope),
                "extra_condition_channels": cfg.extra_condition_channels,
            }
            (folder / "config.json").write_text(json.dumps(config))
            files[name] = folder / "diffusion_pytorch_model.safetensors"
        net = random_weights(net, 5 + seed, scale=0.2)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(files[name]))
    return files


def make_task(tiny_repo, net_file=None, **options) -> QwenImageTrainingTask:
    configs, tokenizer = configs_from_folder(tiny_repo)
    extra = [ModelConfig(path=str(net_file))] if net_file is not None else []
    return QwenImageTrainingTask.from_pretrained(
        configs + extra, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu", **options
    )


def pipe_with(tiny_repo, net_file) -> QwenImagePipeline:
    net = [ModelConfig(path=str(net_file))]
    return QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu", model_configs=net)


@pytest.fixture(scope="module")
def pipes(tiny_repo, net_files):
    return {name: pipe_with(tiny_repo, path) for name, path in net_files.items()}


@pytest.fixture(scope="module")
def tasks(tiny_repo, net_files):
    return {name: make_task(tiny_repo, path) for name, path in net_files.items()}


def rows(slot, controls, masks=None):
    g = torch.Generator().manual_seed(0)
    out = []
    for k, prompt in enumerate(PROMPTS):
        row = {"prompt": prompt, "image": torch.rand(3, 64, 64, generator=g) * 2 - 1}
        row[f"{slot}_image"] = pil_to_tensor(controls[k])[0]  # as the dataset reads the file
        if masks is not None:
            row[f"{slot}_inpaint_mask"] = pil_to_tensor(masks[k])[0]
        out.append(row)
    return out


def pipeline_condition(pipe, slot, control: ControlNetInput):
    """The condition the pipeline denoises with for one control at 64x64 (a `ControlCondition`)."""
    if slot == BLOCKWISE:
        return pipe.encode_blockwise(pipe.check_blockwise([control]), 64, 64, False, (34, 34), (18, 16))[0]
    return pipe.encode_controls(pipe.check_controls([control]), 64, 64)[0]


def pipeline_velocity(pipe, slot, control, prompt, noisy, sigma):
    """The pipeline's per-step call for one prompt and control, as its denoising loop makes it."""
    condition = pipeline_condition(pipe, slot, control)
    text, mask = pipe.encode_prompt([prompt])
    if slot == BLOCKWISE:
        residuals = blockwise_residual([condition])
    else:
        residuals = controlnet_residuals([condition], noisy, sigma, text, mask, pipe.dit.config.num_layers)
    return qwen_image_velocity(pipe.dit, noisy, sigma, text, mask, (), None, residuals)


# ----------------------------------------------------------------------------------------- the task
@pytest.mark.parametrize("kind", ["canny", "union"])
def test_the_net_is_loaded_beside_the_dit_and_is_the_model_trained(tasks, tiny_repo, net_files, kind):
    slot = KINDS[kind][0]
    task = tasks[kind]
    assert task.control == slot and task.trained_model == "dit" and task.denoiser_slot == "dit"
    assert set(task.models) == {"dit", "vae", "text_encoder", slot}
    assert task.models[slot] is task.pipe.controlnets(slot)[0]
    trained = make_task(tiny_repo, net_files[kind], trained_model=slot, encoders=False)
    assert trained.denoiser_slot == slot and trained.validation_references == "required"
    module = trained.models[slot]
    assert module is trained.models[slot]  # one object: the trainer trains and saves it
    assert module.state_dict().keys() == load_file(str(net_files[kind])).keys()  # the released file's keys
    assert trained.model_files[slot] == [str(net_files[kind])]
    encoder_side = make_task(tiny_repo, net_files[kind], denoiser=False)
    assert encoder_side.control == slot and set(encoder_side.models) == {"vae", "text_encoder"}


@pytest.mark.parametrize("kind", list(KINDS))
def test_encoded_condition_is_the_pipelines(tasks, pipes, kind):
    """The cached condition, packed (and for a Blockwise net embedded) as the pipeline does, equals the condition
    the pipeline computes from the same picture (and mask) given as PIL images: the dataset tensor round trip, the
    mask's treatment and 17th channel, the size, are all the pipeline's."""
    slot, inpaint = KINDS[kind]
    controls, masks = [picture(1), picture(2)], [mask_picture(), mask_picture().transpose(Image.FLIP_LEFT_RIGHT)]
    samples = tasks[kind].encode(rows(slot, controls, masks if inpaint else None))
    pipe = pipes[kind]
    net = pipe.controlnets(slot)[0]
    for k, sample in enumerate(samples):
        condition = sample[f"{slot}_condition"]
        assert condition.shape == (17 if inpaint else 16, 8, 8)
        ours = pack(condition[None])
        ours = net.embed(ours) if slot == BLOCKWISE else ours
        control = ControlNetInput(image=controls[k], inpaint_mask=masks[k] if inpaint else None)
        assert torch.equal(ours, pipeline_condition(pipe, slot, control).tokens)


@pytest.mark.parametrize("kind", list(KINDS))
def test_velocity_is_the_pipelines_dit_and_net_call(tiny_repo, net_files, tasks, pipes, kind):
    """The task's model call on a batch of two rows, each with its own control, equals row by row the pipeline's
    per-step call (the DiT with the residuals of the pipeline's condition), both when the DiT trains under the
    frozen net and when the net in training is the trainer's model."""
    slot, inpaint = KINDS[kind]
    controls, masks = [picture(3), picture(4)], [mask_picture(), mask_picture()]
    task, pipe = tasks[kind], pipes[kind]
    batch = task.collate(task.encode(rows(slot, controls, masks if inpaint else None)))
    noisy = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.75, 0.3])
    trained = make_task(tiny_repo, net_files[kind], trained_model=slot, encoders=False)
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], batch, noisy, sigma)
        ours_trained = trained.velocity(trained.models[slot], batch, noisy, sigma)
        plain = task.velocity(task.models["dit"], {k: batch[k] for k in ("latents", "text", "text_mask")}, noisy, sigma)
        for k in range(2):
            control = ControlNetInput(image=controls[k], inpaint_mask=masks[k] if inpaint else None)
            theirs = pipeline_velocity(pipe, slot, control, PROMPTS[k], noisy[k : k + 1], sigma[k : k + 1])
            torch.testing.assert_close(ours[k : k + 1], theirs, atol=5e-6, rtol=0)
            torch.testing.assert_close(ours_trained[k : k + 1], theirs, atol=5e-6, rtol=0)
    assert (ours - plain).abs().max() > 1e-3  # the net acts


@pytest.mark.parametrize("kind", ["canny", "union"])
def test_gradients_reach_only_the_net_in_training(tiny_repo, net_files, tasks, kind):
    slot = KINDS[kind][0]
    trained = make_task(tiny_repo, net_files[kind], trained_model=slot, encoders=False)
    module = trained.models[slot]
    module.requires_grad_(True)
    module.gradient_checkpointing = True  # what --use_gradient_checkpointing sets
    batch = tasks[kind].collate(tasks[kind].encode(rows(slot, [picture(5), picture(6)])))
    noisy = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    trained.velocity(module, batch, noisy, torch.tensor([0.5, 0.9])).square().mean().backward()
    assert trained.pipe.dit.gradient_checkpointing  # passed on to the DiT
    grads = {n: p.grad for n, p in module.named_parameters()}
    assert sum(g is not None and g.abs().sum() > 0 for g in grads.values()) > len(grads) // 2, grads.keys()
    assert all(p.grad is None for p in trained.pipe.dit.parameters())


# ----------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("slot", [BLOCKWISE, CONTROLNET])
def test_rows_with_a_control_need_the_net(tiny_repo, tasks, slot):
    with pytest.raises(ConfigError, match=f"has {slot}_image.*none is among the models"):
        make_task(tiny_repo).encode(rows(slot, [picture(1), picture(2)]))
    other = tasks["union" if slot == BLOCKWISE else "canny"]  # the other kind of net is loaded
    with pytest.raises(ConfigError, match=f"has {slot}_image.*none is among the models"):
        other.encode(rows(slot, [picture(1), picture(2)]))


def test_training_a_net_needs_its_file(tiny_repo, net_files):
    for slot in (BLOCKWISE, CONTROLNET):
        with pytest.raises(ConfigError, match=f"trained_model='{slot}'.*add its file to the models"):
            make_task(tiny_repo, trained_model=slot, encoders=False)
    with pytest.raises(ConfigError, match="trained_model='controlnet'.*InstantX"):
        make_task(tiny_repo, net_files["canny"], trained_model="controlnet", encoders=False)
    with pytest.raises(ConfigError, match="trained_model='vae' is not accepted"):
        make_task(tiny_repo, trained_model="vae", encoders=False)
    configs, tokenizer = configs_from_folder(tiny_repo)
    both = [ModelConfig(path=str(net_files[k])) for k in ("canny", "union")]
    with pytest.raises(ConfigError, match="both a Blockwise and an InstantX ControlNet"):
        QwenImageTrainingTask.from_pretrained(configs + both, torch_dtype="float32", encoders=False)


@pytest.mark.parametrize("kind", ["canny", "union"])
def test_training_the_net_needs_a_control_in_the_batch(tiny_repo, net_files, tasks, kind):
    slot = KINDS[kind][0]
    trained = make_task(tiny_repo, net_files[kind], trained_model=slot, encoders=False)
    task = tasks[kind]
    plain = [{"prompt": r["prompt"], "image": r["image"]} for r in rows(slot, [picture(1), picture(2)])]
    batch = task.collate(task.encode(plain))
    with pytest.raises(ConfigError, match=f"needs rows with {slot}_image"):
        trained.velocity(trained.models[slot], batch, torch.zeros(2, 16, 8, 8), torch.ones(2))


@pytest.mark.parametrize(("kind", "inpaint"), [("canny", "inpaint"), ("union", "inpainting")])
def test_masks_must_fit_the_net_and_batches_agree(tasks, kind, inpaint):
    slot = KINDS[kind][0]
    with pytest.raises(ConfigError, match=f"inpainting net.*{slot}_inpaint_mask"):
        tasks[inpaint].encode(rows(slot, [picture(1), picture(2)]))
    with pytest.raises(ConfigError, match="takes no mask"):
        tasks[kind].encode(rows(slot, [picture(1), picture(2)], [mask_picture()] * 2))
    task = tasks[kind]
    mixed = rows(slot, [picture(1), picture(2)])
    del mixed[1][f"{slot}_image"]
    with pytest.raises(ConfigError, match="--batch_size 1"):
        task.collate(task.encode(mixed))
    unread = rows(slot, [picture(1), picture(2)])
    unread[0][f"{slot}_image"] = "control/0.png"  # a path the dataset was not told to read
    with pytest.raises(ConfigError, match=f"list {slot}_image in --data_file_keys"):
        task.encode(unread)
    masked_only = rows(slot, [picture(1), picture(2)], [mask_picture()] * 2)
    del masked_only[0][f"{slot}_image"]
    with pytest.raises(ConfigError, match=f"{slot}_inpaint_mask but no {slot}_image"):
        tasks[inpaint].encode(masked_only)


@pytest.mark.parametrize(("kind", "inpaint"), [("canny", "inpaint"), ("union", "inpainting")])
def test_validation_images_are_the_control(tasks, pipes, kind, inpaint):
    """`--validation_images` give each sample its control image (an inpainting net: image and mask); a wrong count
    is refused at setup, and a sample equals the pipeline's with that control."""
    slot = KINDS[kind][0]
    assert tasks[kind].reference_arguments([]) == {}
    with pytest.raises(ConfigError, match="one control image; got 2"):
        tasks[kind].reference_arguments([picture(1), picture(2)])
    with pytest.raises(ConfigError, match="its mask"):
        tasks[inpaint].reference_arguments([picture(1)])
    given = tasks[inpaint].reference_arguments([picture(1), mask_picture()])[f"{slot}_inputs"][0]
    assert given.inpaint_mask is not None
    options = {k: v for k, v in FAST.items() if k != "progress_bar"}
    task = tasks[kind]
    (sample,) = task.sample(task.models["dit"], PROMPTS[:1], seed=3, references=[[picture(1)]], **options)
    control = {f"{slot}_inputs": [ControlNetInput(image=picture(1))]}
    expected = pipes[kind](PROMPTS[0], seed=3, **control, **FAST)
    assert np.array_equal(np.asarray(sample), np.asarray(expected))


# ----------------------------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Per ControlNet slot, two captioned noise pictures, each with a control picture in DiffSynth-Studio's
    column (`<slot>_image`)."""
    testing = pytest.importorskip("diffsynth.training.testing")
    found = {}
    for slot in (BLOCKWISE, CONTROLNET):
        folder = tmp_path_factory.mktemp(f"qwen-{slot}-data")
        for k in range(2):
            picture(10 + k).save(folder / f"control{k}.png")
        extra = [{f"{slot}_image": f"control{k}.png"} for k in range(2)]
        found[slot] = testing.write_caption_dataset(folder, PROMPTS, extra=extra)
    return found


@pytest.fixture
def runs(monkeypatch):
    """The trainer's `Run`s (task and model) of the runs a test makes, to look at after training."""
    from diffsynth.training import trainer

    made, setup = [], trainer.setup
    monkeypatch.setattr(trainer, "setup", lambda config: made.append(setup(config)) or made[-1])
    return made


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["canny", "union"])
def test_training_the_net_saves_a_file_the_pipeline_loads(tiny_repo, net_files, datasets, runs, tmp_path, kind):
    """`--trainable_models <slot>`: the net learns, the DiT does not; the saved file holds the released file's
    keys, loads strictly into the pipeline (among its model_configs) and draws what the trained net draws; a
    validation sample is drawn with `--validation_images` as the control."""
    from diffsynth.training.testing import train_with_cli

    slot = KINDS[kind][0]
    flags = ["--model_paths", str(net_files[kind]), "--trainable_models", slot, "--dataset_repeat", "2"]
    flags += ["--data_file_keys", f"image,{slot}_image", "--use_gradient_checkpointing"]
    flags += ["--validation_prompts", PROMPTS[0], "--validation_images", "control0.png"]
    flags += ["--validation_height", "64", "--validation_width", "64", "--validation_num_inference_steps", "2"]
    losses = train_with_cli(tiny_repo, "qwen_image", datasets[slot], tmp_path / "out", *flags)
    assert len(losses) == 2 and all(np.isfinite(losses))
    (run,) = runs
    assert run.task.denoiser_slot == slot and run.task.pipe.dit.gradient_checkpointing
    weights = tmp_path / "out" / "step-000002" / slot / "diffusion_pytorch_model.safetensors"
    saved, original = load_file(str(weights)), load_file(str(net_files[kind]))
    assert saved.keys() == original.keys()
    assert max((saved[k] - original[k]).abs().max() for k in saved) > 1e-4  # the net learnt
    fresh = QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    for name, value in run.task.pipe.dit.state_dict().items():
        assert torch.equal(value, fresh.dit.state_dict()[name]), name  # the DiT did not
    assert (tmp_path / "out" / "validation" / "step-000002-0.png").is_file()
    tuned = pipe_with(tiny_repo, weights)
    trained_net = run.task.pipe.controlnets(slot)[0]
    for name, value in tuned.controlnets(slot)[0].state_dict().items():
        assert torch.equal(value, trained_net.state_dict()[name]), name
    control = {f"{slot}_inputs": [ControlNetInput(image=picture(10))]}
    run.task.pipe.dit.gradient_checkpointing = False
    after = tuned(PROMPTS[0], seed=0, output_type="pt", **control, **FAST)
    drawn = run.task.pipe(PROMPTS[0], seed=0, output_type="pt", **control, **FAST)
    torch.testing.assert_close(after, drawn, atol=1e-6, rtol=0)


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["canny", "union"])
def test_dit_lora_under_the_frozen_net(tiny_repo, net_files, datasets, runs, tmp_path, kind):
    """DiffSynth-Studio's LoRA recipe: the DiT's LoRA trains with the net's residuals, the net stays as loaded, and
    the LoRA file changes what the pipeline draws under the net."""
    from diffsynth.training.testing import outputs_before_and_after_lora, train_with_cli

    slot = KINDS[kind][0]
    flags = ["--model_paths", str(net_files[kind]), "--data_file_keys", f"image,{slot}_image", "--dataset_repeat", "2"]
    losses = train_with_cli(tiny_repo, "qwen_image", datasets[slot], tmp_path / "out", *flags)
    assert len(losses) == 2 and all(np.isfinite(losses))
    (run,) = runs
    assert run.task.denoiser_slot == "dit"
    original = load_file(str(net_files[kind]))
    net = run.task.pipe.controlnets(slot)[0]
    assert all(torch.equal(v, original[k]) for k, v in net.state_dict().items())
    control = {f"{slot}_inputs": [ControlNetInput(image=picture(10))]}
    lora = tmp_path / "out" / "step-000002.safetensors"
    base, after = outputs_before_and_after_lora(
        pipe_with(tiny_repo, net_files[kind]), lora, PROMPTS[0], seed=0, output_type="pt", **control, **FAST
    )
    assert (after - base).abs().max() > 1e-4


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["canny", "union"])
def test_two_processes_train_the_net_as_one_accumulating(tiny_repo, net_files, tmp_path, kind):
    """Under DDP (two CPU processes, gloo) the net trains as one process accumulating the same two micro-batches:
    the trainer's prepared model is called once per step with every use of the net inside (a Blockwise net's
    residuals between the DiT's blocks included), so DDP reduces all of its gradients."""
    from pathlib import Path

    testing = pytest.importorskip("diffsynth.training.testing")
    from diffsynth.training.trainer import train

    toy = testing.load_module(Path(__file__).parents[2] / "training" / "tests" / "toy.py", "qwen_controlnet_toy")
    slot = KINDS[kind][0]
    folder = tmp_path / "data"
    folder.mkdir()
    prompts = PROMPTS + ["a yellow star", "a green triangle"]
    for k in range(len(prompts)):
        picture(20 + k).save(folder / f"control{k}.png")
    extra = [{f"{slot}_image": f"control{k}.png"} for k in range(len(prompts))]
    dataset = testing.write_caption_dataset(folder, prompts, extra=extra)
    settings = dict(
        batch_size=1,
        max_steps=2,
        save_steps=2,
        weight_decay=0.0,
        trainable_models=[slot],
        model_paths=[str(net_files[kind])],
    )
    keys = ["image", f"{slot}_image"]
    train(
        testing.tiny_config(
            tiny_repo,
            "qwen_image",
            dataset,
            tmp_path / "one",
            gradient_accumulation_steps=2,
            data_file_keys=keys,
            **settings,
        )
    )
    flags = {
        **testing.TINY_SETTINGS,
        **settings,
        "model": tiny_repo,
        "family": "qwen_image",
        "dataset_base_path": dataset,
    }
    flags |= {"trainable_models": slot, "model_paths": str(net_files[kind]), "data_file_keys": ",".join(keys)}
    toy.run_two_processes(tmp_path, {**flags, "output_path": tmp_path / "ddp"})
    name = Path("step-000002") / slot / "diffusion_pytorch_model.safetensors"
    one, ddp = (load_file(str(tmp_path / run / name)) for run in ("one", "ddp"))
    original = load_file(str(net_files[kind]))
    assert one.keys() == ddp.keys() == original.keys()
    assert max((one[k] - original[k]).abs().max() for k in one) > 1e-2  # it trained: Adam moves weights ~lr a step
    # the same to round-off: Adam divides each gradient by its own size, so for the nearly unused weights (an
    # InstantX net's text stream) the order of the gradient sum shows at ~1e-5; an unreduced gradient would
    # differ by a whole step (~1e-2)
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], rtol=0, atol=1e-4, msg=k)

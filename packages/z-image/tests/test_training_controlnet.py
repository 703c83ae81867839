"""Z-Image Fun ControlNet training: rows with `controlnet_image` (DiffSynth-Studio's column) encoded as
`ZImagePipeline.encode_control` encodes a `ControlNetInput`, the task's velocity equal to the pipeline's per-step
call under the control, the ControlNet trained in the DiT's place (`trained_model="controlnet"`), validation samples
with the control image, the refusals, and the trainer (`diffsynth-train --family z_image`) training the net in
full, a LoRA on the net, and a DiT LoRA under the frozen net, on the tiny repo with a tiny Union 2.1 net.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import pil_to_tensor
from diffsynth.runtime.pipeline import configs_from_folder
from diffsynth.z_image import ControlNetInput, ZImagePipeline
from diffsynth.z_image.controlnet import ZImageControl, ZImageControlNet
from diffsynth.z_image.training import ZImageTrainingTask

PROMPTS = ["a red circle on a blue background", "a small green square in the top left corner"]


def _test_controlnet():
    """The tiny ControlNet sizes live in test_controlnet.py (`tiny_config`, `make_net`, `write_net`)."""
    path = Path(__file__).with_name("test_controlnet.py")
    spec = importlib.util.spec_from_file_location("z_image_test_controlnet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


C = _test_controlnet()


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def net_files(tmp_path_factory) -> dict[str, Path]:
    """A Union 2.1 and a 1.0 net for the tiny repo's DiT (2 main layers, 1 refiner layer), with config.json."""
    root = tmp_path_factory.mktemp("train-controlnets")
    nets = {
        "2.1": C.make_net(C.tiny_config("2.1", places=(0, 1), refiner=(0,)), seed=7),
        "1.0": C.make_net(C.tiny_config("1.0", places=(0, 1)), seed=8),
    }
    return {name: C.write_net(root / name, net) for name, net in nets.items()}


def configs(repo: Path, *extra: Path) -> tuple[list[ModelConfig], ModelConfig]:
    found, tokenizer = configs_from_folder(repo)
    return found + [ModelConfig(path=str(p)) for p in extra], tokenizer


def make_task(repo: Path, *extra: Path, **options) -> ZImageTrainingTask:
    found, tokenizer = configs(repo, *extra)
    return ZImageTrainingTask.from_pretrained(
        found, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu", **options
    )


@pytest.fixture(scope="module")
def pipe(tiny_repo, net_files) -> ZImagePipeline:
    return ZImagePipeline.from_pretrained(
        str(tiny_repo), torch_dtype="float32", device="cpu", controlnet=str(net_files["2.1"])
    )


@pytest.fixture(scope="module")
def task(tiny_repo, net_files) -> ZImageTrainingTask:
    return make_task(tiny_repo, net_files["2.1"])


def picture(seed: int, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def mask(size: int = 64) -> Image.Image:
    """White (repaint) on the left half."""
    gray = np.zeros((size, size), np.uint8)
    gray[:, : size // 2] = 255
    return Image.fromarray(gray).convert("RGB")


def make_rows(controls: list[dict | None]) -> list[dict]:
    """64x64 targets; each row's control columns as the dataset gives them (images as [-1, 1] tensors at the row's
    size, the scale as a CSV string)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, columns in enumerate(controls):
        row = {"prompt": PROMPTS[i % 2], "image": torch.rand(3, 64, 64, generator=g) * 2 - 1}
        for key, value in (columns or {}).items():
            row[key] = pil_to_tensor(value)[0] if isinstance(value, Image.Image) else value
        rows.append(row)
    return rows


CONTROLS = [
    {"controlnet_image": picture(1)},
    {"controlnet_image": picture(2), "controlnet_scale": "0.5"},
    None,  # a plain text-to-image row
    {"controlnet_inpaint_image": picture(3), "controlnet_inpaint_mask": mask(), "controlnet_scale": "0.5"},
]
AS_INPUTS = [  # the same controls as the pipeline's `ControlNetInput`s
    ControlNetInput(image=picture(1)),
    ControlNetInput(image=picture(2), scale=0.5),
    None,
    ControlNetInput(inpaint_image=picture(3), inpaint_mask=mask(), scale=0.5),
]


def condition(pipe: ZImagePipeline, item: ControlNetInput, net=None) -> torch.Tensor:
    return pipe.encode_control(item, net or pipe.controlnets()[0], 64, 64).control.latents


def test_control_rows_are_encoded_as_the_pipeline_encodes_them(task, pipe):
    """A control image (2.1: its latents, a zero mask channel, the latents of an all-zero image), one with a scale,
    none, and an inpainting pair: the condition is the pipeline's `encode_control` for the same `ControlNetInput`,
    bit for bit; the target latents and the prompt are the pipeline's too."""
    assert task.trained_model == "dit" and task.denoiser_slot == "dit"
    assert isinstance(task.models["controlnet"], ZImageControlNet)  # the net, not the pipeline's slot of nets
    rows = make_rows(CONTROLS)
    samples = task.encode(rows)
    assert [set(s) for s in samples] == [{"latents", "text", "control", "control_scale"}] * 2 + [
        {"latents", "text"},
        {"latents", "text", "control", "control_scale"},
    ]
    target = pipe.vae.encode(torch.stack([row["image"] for row in rows]))
    text = pipe.encode_prompt([row["prompt"] for row in rows])
    for sample, item, lat, emb in zip(samples, AS_INPUTS, target, text, strict=True):
        assert torch.equal(sample["latents"], lat) and torch.equal(sample["text"], emb)
        if item is not None:
            assert torch.equal(sample["control"][None], condition(pipe, item))
            assert float(sample["control_scale"]) == item.scale
    assert samples[0]["control"].shape == (9, 8, 8)  # 4 + 1 + 4 channels
    assert torch.equal(samples[0]["control"][4:5], torch.zeros(1, 8, 8))  # no mask: the kept region is 0
    assert torch.equal(samples[3]["control"][:4], torch.zeros(4, 8, 8))  # no control image: zero latents
    # PIL images and paths, as the pipeline takes them, give the same condition as the dataset's tensors
    plain = dict(rows[0], controlnet_image=picture(1))
    assert torch.equal(task.encode([plain])[0]["control"], samples[0]["control"])


def test_a_union_1_0_net_takes_the_control_latents_alone(tiny_repo, net_files):
    task = make_task(tiny_repo, net_files["1.0"])
    pipe = task.pipe
    sample = task.encode(make_rows(CONTROLS[:1]))[0]
    assert sample["control"].shape == (4, 8, 8)
    assert torch.equal(sample["control"][None], condition(pipe, AS_INPUTS[0], task.controlnet))
    with pytest.raises(ConfigError, match=r"row 0 of the batch .*\(Union 1.0\) takes no inpainting"):
        task.encode(make_rows(CONTROLS[3:]))


def test_velocity_is_the_pipeline_per_step_call_under_the_control(task, pipe):
    """A batch of a control at scale 1, one at 0.5, a plain row and an inpainting pair: each sample's velocity is
    the pipeline's `predict` (its per-step call) with that `ZImageControl`, at the sample's noise level; the control
    counts (without it the prediction differs)."""
    rows = make_rows(CONTROLS)
    batch = task.collate(task.encode(rows))
    noisy = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.8, 0.45, 0.3, 0.1])
    net = pipe.controlnets()[0]
    worst = 0.0
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], batch, noisy, sigma)
        for i, item in enumerate(AS_INPUTS):
            text = pipe.encode_prompt([rows[i]["prompt"]])
            controls = [] if item is None else [ZImageControl(net, condition(pipe, item), item.scale)]
            theirs = pipe.predict(noisy[i : i + 1], sigma[i], text, None, 1.0, 0.0, controls)
            torch.testing.assert_close(ours[i : i + 1], theirs, rtol=0, atol=1e-5)
            worst = max(worst, float((ours[i : i + 1] - theirs).abs().max()))
        plain = pipe.predict(noisy[:1], sigma[0], pipe.encode_prompt([rows[0]["prompt"]]), None, 1.0, 0.0, [])
    assert ours.shape == noisy.shape and (ours[:1] - plain).abs().max() > 1e-3
    print(f"max |task - pipeline| = {worst:.2e}")


def test_training_the_controlnet_alone(tiny_repo, net_files, task):
    """`trained_model="controlnet"`: the trainer's model is the net; the same prediction as with the DiT in
    training, the gradient reaches the net and not the frozen DiT, and gradient checkpointing asked of the net
    reaches the DiT."""
    trained = make_task(tiny_repo, net_files["2.1"], trained_model="controlnet")
    assert trained.denoiser_slot == "controlnet" and trained.validation_references == "required"
    assert "controlnet" in trained.model_files and "controlnet" in ZImageTrainingTask.trainable_slots
    net, dit = trained.models["controlnet"], trained.pipe.dit
    assert isinstance(net, ZImageControlNet) and net is trained.pipe.controlnets()[0]
    batch = trained.collate(trained.encode(make_rows(CONTROLS[:2])))
    noisy, sigma = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([0.7, 0.3])
    net.requires_grad_(True)
    try:
        out = trained.velocity(net, batch, noisy, sigma)
        out.square().mean().backward()
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
        assert all(p.grad is None for p in dit.parameters())
        net.gradient_checkpointing = True
        again = trained.velocity(net, batch, noisy, sigma)
        assert dit.gradient_checkpointing
    finally:
        net.requires_grad_(False).zero_grad(set_to_none=True)
        net.gradient_checkpointing = dit.gradient_checkpointing = False
    with torch.no_grad():
        reference = task.velocity(task.models["dit"], task.collate(task.encode(make_rows(CONTROLS[:2]))), noisy, sigma)
    torch.testing.assert_close(out.detach(), reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(again.detach(), reference, rtol=0, atol=1e-6)


def test_validation_samples_take_the_control_image(tiny_repo, net_files, task, pipe):
    """`sample` (the trainer's --validation_images as the control image) draws what the pipeline draws with
    `ControlNetInput(image=...)`, the DiT in training or the net in training alike; without an image a DiT trained
    under the net draws from text alone."""
    size = {"height": 32, "width": 32, "num_inference_steps": 2, "output_type": "np"}
    assert task.validation_references == "expected"
    assert task.reference_arguments([]) == {}
    trained = make_task(tiny_repo, net_files["2.1"], trained_model="controlnet")
    with torch.no_grad():
        theirs = pipe(
            PROMPTS[0], controlnet_inputs=[ControlNetInput(image=picture(4))], seed=3, progress_bar=False, **size
        )
        plain = pipe(PROMPTS[0], seed=3, progress_bar=False, **size)
        for t in (task, trained):
            model = t.models[t.denoiser_slot]
            ours = t.sample(model, PROMPTS[:1], seed=3, references=[[picture(4)]], **size)[0]
            assert np.abs(ours - theirs).max() <= 1e-6
        without = task.sample(task.models["dit"], PROMPTS[:1], seed=3, **size)[0]
    assert np.abs(without - plain).max() <= 1e-6 and np.abs(theirs - plain).max() > 1e-4
    with pytest.raises(ConfigError, match="need its control image: give --validation_images"):
        trained.reference_arguments([])
    with pytest.raises(ConfigError, match="2 images for one validation sample; with a ControlNet it takes one"):
        task.reference_arguments([picture(4), picture(5)])


def test_the_encoding_stage_encodes_the_control_without_the_dit(tiny_repo, net_files, task):
    """A cache's first stage loads the encoders and the net, not the DiT, and encodes the same conditions."""
    encoder_only = make_task(tiny_repo, net_files["2.1"], denoiser=False)
    assert set(encoder_only.models) == {"vae", "text_encoder", "controlnet"}
    rows = make_rows(CONTROLS)
    for ours, theirs in zip(encoder_only.encode(rows), task.encode(rows), strict=True):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    trainer_side = make_task(tiny_repo, net_files["2.1"], encoders=False, trained_model="controlnet")
    assert set(trainer_side.models) == {"dit", "controlnet"}


def test_clear_errors(tiny_repo, net_files, task):
    plain = make_task(tiny_repo)
    assert plain.controlnet is None and plain.validation_references == "none"
    with pytest.raises(ConfigError, match=r"row 1 of the batch .* has controlnet_image, but no Z-Image ControlNet"):
        plain.encode(make_rows([None, CONTROLS[0]]))
    with pytest.raises(ConfigError, match="trained_model='controlnet' .* add its file"):
        make_task(tiny_repo, trained_model="controlnet")
    with pytest.raises(ConfigError, match="trained_model='vace' is not accepted"):
        make_task(tiny_repo, net_files["2.1"], trained_model="vace")
    with pytest.raises(ConfigError, match="hold 2 Z-Image ControlNets; training takes one"):
        make_task(tiny_repo, net_files["2.1"], net_files["2.1"])

    trained = make_task(tiny_repo, net_files["2.1"], trained_model="controlnet")
    with pytest.raises(ConfigError, match=r"row 1 of the batch .* has no controlnet_image: training the ControlNet"):
        trained.encode(make_rows([CONTROLS[0], None]))
    # a batch encoded without controls (a cache of plain rows) reaches the model call: refused there too
    batch = task.collate(task.encode(make_rows([CONTROLS[0], None])))
    noisy, sigma = torch.zeros(2, 4, 8, 8), torch.tensor([0.5, 0.5])
    with pytest.raises(ConfigError, match="training the ControlNet needs a controlnet_image in every sample; .* 1 "):
        trained.velocity(trained.models["controlnet"], batch, noisy, sigma)
    with pytest.raises(ConfigError, match="has controlnet_image conditions but no Z-Image ControlNet is loaded"):
        plain.velocity(plain.models["dit"], batch, noisy, sigma)
    # a cache encoded with a Union 2.1 net (9 control channels) trained with a 1.0 net (4)
    union_1_0 = make_task(tiny_repo, net_files["1.0"])
    with pytest.raises(ConfigError, match="cache.* for a net taking 9 control channels; the loaded ControlNet takes 4"):
        union_1_0.collate(task.encode(make_rows([CONTROLS[0], None])))

    with pytest.raises(ConfigError, match=r"row 0 .*controlnet_scale='strong' is not a number"):
        task.encode(make_rows([dict(CONTROLS[0], controlnet_scale="strong")]))
    with pytest.raises(ConfigError, match="row 0 .*controlnet_image is a list"):
        task.encode(make_rows([{"controlnet_image": [picture(1), picture(2)]}]))
    with pytest.raises(ConfigError, match="row 0 .*'control0.png' was not read as an image: list controlnet_image in"):
        task.encode(make_rows([{"controlnet_image": "control0.png"}]))  # a path the dataset left as it is
    with pytest.raises(ConfigError, match="row 0 .*inpaint_mask and inpaint_image go together"):
        task.encode(make_rows([{"controlnet_image": picture(1), "controlnet_inpaint_mask": mask()}]))


# ----------------------------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Two 64x64 targets, each with its control map (a path in `controlnet_image`), the second at scale 0.5."""
    testing = pytest.importorskip("diffsynth.training.testing")
    folder = tmp_path_factory.mktemp("controlnet-data")
    for i in range(2):
        picture(20 + i).save(folder / f"control{i}.png")
    extra = [{"controlnet_image": "control0.png"}, {"controlnet_image": "control1.png", "controlnet_scale": 0.5}]
    return testing.write_caption_dataset(folder, PROMPTS, seed=1, extra=extra)


def train_config(repo, net_file, dataset, output, **overrides):
    from diffsynth.training.testing import tiny_config

    settings = {"model_paths": [str(net_file)], "data_file_keys": ["image", "controlnet_image"], **overrides}
    return tiny_config(repo, "z_image", dataset, output, **{"learning_rate": 1e-3, **settings})


def trained_velocity(task: ZImageTrainingTask, model, rows) -> torch.Tensor:
    batch = task.collate(task.encode(rows))
    noisy, sigma = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([0.6, 0.3])
    with torch.no_grad():
        return task.velocity(model, batch, noisy, sigma)


@pytest.mark.integration
def test_trainer_trains_the_controlnet_and_saves_a_file_the_pipeline_loads(tiny_repo, net_files, dataset, tmp_path):
    """`--trainable_models controlnet`: two steps change the net's weights and not the DiT's; the saved file has the
    official keys, loads strictly into `ZImagePipeline.load_controlnet` and gives the trained net's predictions."""
    trainer = pytest.importorskip("diffsynth.training.trainer")
    from diffsynth.training.data import batch_plan

    validation = dict(validation_prompts=[PROMPTS[0]], validation_images=["control0.png"])
    validation.update(validation_height=32, validation_width=48, validation_num_inference_steps=2)
    config = train_config(
        tiny_repo, net_files["2.1"], dataset, tmp_path / "out", trainable_models=["controlnet"], **validation
    )
    run = trainer.setup(config)
    assert run.task.trained_model == "controlnet" and run.dataset[1]["controlnet_image"].shape == (3, 64, 64)
    before = {k: v.clone() for k, v in run.task.models["controlnet"].state_dict().items()}
    dit_before = {k: v.clone() for k, v in run.task.pipe.dit.state_dict().items()}
    state = trainer.TrainState()
    for _ in range(2):
        for batch in batch_plan(run.dataset.batch_keys, batch_size=2):
            state = trainer.train_step(run, state, [[run.dataset[i] for i in batch]])
            assert np.isfinite(state.loss) and state.loss > 0
    trainer.save(run, state)
    assert state.step == 2
    drawn = trainer.validate(run, state)  # the control image of --validation_images reaches the pipeline
    assert [p.name for p in drawn] == ["step-000002-0.png"]
    with Image.open(drawn[0]) as image:
        assert image.size == (48, 32)
    net = run.task.models["controlnet"]
    assert any(not torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all(torch.equal(v, dit_before[k]) for k, v in run.task.pipe.dit.state_dict().items())

    saved = tmp_path / "out" / "step-000002" / "controlnet" / "diffusion_pytorch_model.safetensors"
    weights, original = load_file(str(saved)), load_file(str(net_files["2.1"]))
    assert weights.keys() == original.keys()  # the official keys
    pipe = ZImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    assert pipe.load_controlnet(str(saved)) == [0]
    for key, value in pipe.controlnets()[0].state_dict().items():
        assert torch.equal(value, weights[key])
    rows = make_rows(CONTROLS[:2])
    reloaded = ZImageTrainingTask(pipe)
    trained = trained_velocity(run.task, net.eval(), rows)
    torch.testing.assert_close(trained_velocity(reloaded, pipe.dit, rows), trained, rtol=0, atol=1e-6)
    original_pipe = ZImageTrainingTask(
        pipe.__class__.from_pretrained(
            str(tiny_repo), torch_dtype="float32", device="cpu", controlnet=str(net_files["2.1"])
        )
    )
    assert (trained_velocity(original_pipe, original_pipe.pipe.dit, rows) - trained).abs().max() > 1e-5


@pytest.mark.integration
def test_trainer_trains_a_lora_on_the_controlnet(tiny_repo, net_files, dataset, tmp_path):
    """`--lora_base_model controlnet`: only the net's LoRA learns; the saved file, applied to the pipeline's net
    with the runtime's `load_lora`, gives the trained predictions."""
    trainer = pytest.importorskip("diffsynth.training.trainer")

    config = train_config(tiny_repo, net_files["2.1"], dataset, tmp_path / "out", lora_base_model="controlnet")
    run = trainer.setup(config)
    frozen = {k: v.clone() for k, v in run.model.state_dict().items() if "lora_" not in k}
    state = trainer.TrainState()
    for _ in range(2):
        state = trainer.train_step(run, state, [[run.dataset[0], run.dataset[1]]])
    trainer.save(run, state)
    after = run.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert any(after[k].abs().max() > 0 for k in after if "lora_B" in k)
    saved = tmp_path / "out" / "step-000002.safetensors"
    assert all(k.startswith(("control_layers.", "control_noise_refiner.")) for k in load_file(str(saved)))

    pipe = ZImagePipeline.from_pretrained(
        str(tiny_repo), torch_dtype="float32", device="cpu", controlnet=str(net_files["2.1"])
    )
    rows = make_rows(CONTROLS[:2])
    base = trained_velocity(ZImageTrainingTask(pipe), pipe.dit, rows)
    pipe.load_lora(str(saved), fuse=False, slot="controlnet", name="trained")  # onto the slot's one net
    applied = trained_velocity(ZImageTrainingTask(pipe), pipe.dit, rows)
    trained = trained_velocity(run.task, run.model, rows)
    torch.testing.assert_close(applied, trained, rtol=0, atol=1e-5)
    assert (applied - base).abs().max() > 1e-5


@pytest.mark.integration
def test_trainer_trains_a_dit_lora_under_the_frozen_controlnet(tiny_repo, net_files, dataset, tmp_path):
    """DiffSynth-Studio's LoRA recipe (`--lora_base_model dit --extra_inputs controlnet_image`): the DiT's LoRA
    learns under the frozen net, whose weights stay; the file, loaded by the pipeline, gives the trained DiT's
    predictions under the control."""
    trainer = pytest.importorskip("diffsynth.training.trainer")

    run = trainer.setup(train_config(tiny_repo, net_files["2.1"], dataset, tmp_path / "out"))
    assert run.task.denoiser_slot == "dit"
    net_before = {k: v.clone() for k, v in run.task.models["controlnet"].state_dict().items()}
    state = trainer.train_step(run, trainer.TrainState(), [[run.dataset[0], run.dataset[1]]])
    trainer.save(run, state)
    assert all(torch.equal(v, net_before[k]) for k, v in run.task.models["controlnet"].state_dict().items())
    pipe = ZImagePipeline.from_pretrained(
        str(tiny_repo), torch_dtype="float32", device="cpu", controlnet=str(net_files["2.1"])
    )
    rows = make_rows(CONTROLS[:2])
    base = trained_velocity(ZImageTrainingTask(pipe), pipe.dit, rows)
    pipe.load_lora(tmp_path / "out" / "step-000001.safetensors", fuse=False, name="trained")
    applied = trained_velocity(ZImageTrainingTask(pipe), pipe.dit, rows)
    torch.testing.assert_close(applied, trained_velocity(run.task, run.model, rows), rtol=0, atol=1e-5)
    assert (applied - base).abs().max() > 1e-5


@pytest.mark.integration
def test_cached_two_stage_training_of_the_controlnet_equals_direct_training(tiny_repo, net_files, dataset, tmp_path):
    """The encode stage (encoders and net, no DiT) stores each row's condition and scale; training the net from
    the cache checkpoints what direct training does."""
    testing = pytest.importorskip("diffsynth.training.testing")
    config = train_config(tiny_repo, net_files["2.1"], dataset, tmp_path, trainable_models=["controlnet"], num_epochs=2)
    runs = testing.train_direct_and_cached(config)
    first, second = runs.cached_item(0), runs.cached_item(1)
    assert set(first) == {"latents", "text", "control", "control_scale"} and first["control"].shape == (9, 8, 8)
    assert float(first["control_scale"]) == 1.0 and float(second["control_scale"]) == 0.5
    direct, cached = runs.checkpoints(2)
    assert direct.keys() == cached.keys() and len(direct) > 0
    for name in direct:  # the encode stage batches the rows otherwise: equal to float rounding of the VAE
        torch.testing.assert_close(cached[name], direct[name], rtol=0, atol=1e-5)
    online, offline = runs.losses()
    assert offline == pytest.approx(online, rel=1e-5)


@pytest.mark.integration
def test_two_processes_train_the_controlnet_as_one_accumulating_two_micro_batches(tiny_repo, net_files, tmp_path):
    """DDP (two CPU processes, gloo): the net's control blocks run after the DiT's layers, outside the net's own
    forward; the task runs the whole model call through the trainer's wrapped net, so DDP reduces every gradient
    (with the family's `ddp_find_unused_parameters` it would otherwise fail: "marked as ready twice")."""
    testing = pytest.importorskip("diffsynth.training.testing")
    toy = testing.load_module(Path(__file__).parents[2] / "training" / "tests" / "toy.py", "diffsynth_training_toy")
    from diffsynth.training.trainer import train

    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        picture(30 + i).save(data / f"control{i}.png")
    prompts = [*PROMPTS, "a yellow triangle on a black background", "bad quality, blurry"]
    testing.write_caption_dataset(data, prompts, extra=[{"controlnet_image": f"control{i}.png"} for i in range(4)])
    settings = dict(batch_size=1, max_steps=2, save_steps=2, weight_decay=0.0)
    one = train_config(tiny_repo, net_files["2.1"], data, tmp_path / "one", trainable_models=["controlnet"])
    train(replace(one, gradient_accumulation_steps=2, learning_rate=1e-2, **settings))
    flags = {**testing.TINY_SETTINGS, **settings, "model": tiny_repo, "family": "z_image", "dataset_base_path": data}
    flags.update(model_paths=net_files["2.1"], data_file_keys="image,controlnet_image", trainable_models="controlnet")
    toy.run_two_processes(tmp_path, {**flags, "output_path": tmp_path / "ddp"})
    weights = Path("step-000002") / "controlnet" / "diffusion_pytorch_model.safetensors"
    single, ddp = load_file(str(tmp_path / "one" / weights)), load_file(str(tmp_path / "ddp" / weights))
    original = load_file(str(net_files["2.1"]))
    assert max(float((single[k] - original[k]).abs().max()) for k in single) > 1e-4  # it trained
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=1e-6)

"""FLUX.1 AttriCtrl training: a row's `value_controller_inputs` become the tokens the pipeline's
`prepare_value_control` appends to the prompt's T5 states, the task's velocity is the pipeline's per-step call with
them, and the trainer trains the encoder itself (`--trainable_models value_controller`, the DiT frozen) into a file
`load_value_controller` reads, or a DiT LoRA under the frozen encoder.

The encoders are tiny AttriCtrl encoders of the tiny repo's T5 width (32; 16 sinusoidal features, 4 tokens) written
as the released single files; the repo is conftest's at 32 T5 tokens. The trainer tests are `integration` (they need
diffsynth-training installed).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffsynth.flux.flux1.text_encoder import FluxPromptEmbeds
from diffsynth.flux.flux1.value_control import ValueEncoder, ValueEncoderConfig
from diffsynth.flux.pipeline import FluxImagePipeline
from diffsynth.flux.training import FluxTrainingTask
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.pipeline import configs_from_folder
from diffsynth.runtime.testing.weights import random_weights

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a cat on a sofa", "a lighthouse at dusk"]
VALUES = ["0.2", 0.85]  # a CSV cell's text and a JSON number
T5_TOKENS = 32
SIZE = 64


@pytest.fixture(scope="module")
def repo(tiny_repo, tmp_path_factory) -> Path:
    """The tiny FLUX.1 repo at 32 T5 tokens (the pipeline and the task both read the setting)."""
    root = shutil.copytree(tiny_repo, tmp_path_factory.mktemp("attrictrl-train") / "repo")
    (root / "diffsynth.json").write_text(json.dumps({"defaults": {"t5_sequence_length": T5_TOKENS}}))
    return root


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> list[Path]:
    """Two attribute encoders (`brightness`, `saturation`), each a released-layout single file."""
    root = tmp_path_factory.mktemp("attrictrl-encoders")
    paths = []
    for seed, name in enumerate(("brightness", "saturation")):
        encoder = random_weights(ValueEncoder(ValueEncoderConfig(embedding_dim=16, dim=32, tokens=4)), seed, scale=0.3)
        paths.append(root / f"{name}.safetensors")
        save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(paths[-1]))
    return paths


def load_task(repo, files=(), **kwargs) -> FluxTrainingTask:
    configs, tokenizer = configs_from_folder(repo)
    configs += [ModelConfig(path=str(f)) for f in files]
    return FluxTrainingTask.from_pretrained(
        configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu", **kwargs
    )


def load_pipe(repo, files=()) -> FluxImagePipeline:
    pipe = FluxImagePipeline.from_pretrained(str(repo), torch_dtype="float32", device="cpu")
    for f in files:
        pipe.load_value_controller(str(f))
    return pipe


@pytest.fixture(scope="module")
def task(repo, encoders):
    return load_task(repo, encoders[:1])


@pytest.fixture(scope="module")
def pipe(repo, encoders):
    return load_pipe(repo, encoders[:1])


def rows(values=VALUES, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"prompt": prompt, "image": torch.rand(3, SIZE, SIZE, generator=g) * 2 - 1, "value_controller_inputs": value}
        for prompt, value in zip(PROMPTS, values, strict=True)
    ]


def pipeline_text(pipe, index: int, values) -> FluxPromptEmbeds:
    """The prompt of row `index` as the pipeline's denoise loop reads it: T5 states with the AttriCtrl tokens."""
    text = pipe.encode_prompt(PROMPTS[index : index + 1], T5_TOKENS)
    return pipe.prepare_value_control(values, text, None)[0]


def dit_text(task, model, batch, noisy, sigma) -> torch.Tensor:
    """The text states the DiT reads in the task's velocity."""
    seen = []
    hook = task.pipe.dit.register_forward_pre_hook(lambda m, args: seen.append(args[2]))
    try:
        task.velocity(model, batch, noisy, sigma)
    finally:
        hook.remove()
    return seen[0]


NOISY = torch.randn(2, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(1))
SIGMA = torch.tensor([0.7, 0.25])


# ------------------------------------------------------------------ encodings
def test_values_are_cached_and_the_dit_reads_the_pipelines_tokens(task, pipe, repo, encoders):
    """The cache holds the values alone (the tokens depend on the encoder's weights); the DiT then reads, for each
    row, exactly the text `prepare_value_control` gives the pipeline's DiT for the row's value."""
    assert task.value_encoders == 1 and task.models["value_controller"] is task.pipe.value_controller.encoders[0]
    samples = task.encode(rows())
    assert [s["value_controller_inputs"].tolist() for s in samples] == [[pytest.approx(0.2)], [pytest.approx(0.85)]]
    assert all(s["value_controller_inputs"].dtype == torch.float32 for s in samples)
    batch = task.collate(samples)
    with torch.no_grad():
        txt = dit_text(task, task.models["dit"], batch, NOISY, SIGMA)
        assert txt.shape == (2, T5_TOKENS + 4, 32)
        for i, value in enumerate([0.2, 0.85]):
            assert torch.equal(txt[i : i + 1], pipeline_text(pipe, i, value).t5)
    # a list cell, one value per encoder; the encoding stage (no DiT, no encoder loaded) counts the files' headers
    encoder_side = load_task(repo, encoders[:1], denoiser=False)
    assert encoder_side.pipe.value_controller is None and encoder_side.value_encoders == 1
    again = encoder_side.encode(rows(values=[[0.2], "[0.85]"]))
    assert all(
        torch.equal(a["value_controller_inputs"], b["value_controller_inputs"])
        for a, b in zip(again, samples, strict=True)
    )


# ------------------------------------------------------------------ the model call
def test_velocity_is_the_pipeline_per_step_call_with_the_value_tokens(task, pipe):
    """The task's velocity equals the pipeline's `predict` (embedded guidance 1) on the text `prepare_value_control`
    gives, row by row: bit for bit for one row, to float32 batching rounding for two; the same when the encoder is
    the model the trainer trains; another value gives another prediction."""
    batch = task.collate(task.encode(rows()))
    trained = FluxTrainingTask(task.pipe, trained_model="value_controller", t5_sequence_length=T5_TOKENS)
    assert trained.denoiser_slot == "value_controller"
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], batch, NOISY, SIGMA)
        worst = 0.0
        for i, value in enumerate([0.2, 0.85]):
            theirs = pipe.predict(NOISY[i : i + 1], SIGMA[i], pipeline_text(pipe, i, value), None, 1.0, 1.0)
            alone = task.velocity(
                task.models["dit"], task.collate(task.encode(rows()[i : i + 1])), NOISY[i : i + 1], SIGMA[i]
            )
            assert torch.equal(alone, theirs)
            worst = max(worst, (ours[i : i + 1] - theirs).abs().max().item())
        assert worst <= 5e-6, worst  # measured: about 1.1e-6 (a batch of two vs. one row)
        as_encoder = trained.velocity(trained.models["value_controller"], batch, NOISY, SIGMA)
        assert torch.equal(as_encoder, ours)
        other = task.collate(task.encode(rows(values=[0.9, 0.05])))
        assert (task.velocity(task.models["dit"], other, NOISY, SIGMA) - ours).abs().max() > 1e-4
        plain = {k: v for k, v in batch.items() if k != "value_controller_inputs"}
        text = pipe.encode_prompt(PROMPTS, T5_TOKENS)
        assert torch.equal(
            task.velocity(task.models["dit"], plain, NOISY, SIGMA), pipe.predict(NOISY, SIGMA, text, None, 1.0, 1.0)
        )


def test_two_encoders_append_their_tokens_in_load_order(repo, encoders):
    task = load_task(repo, encoders)
    pipe = load_pipe(repo, encoders)
    assert task.value_encoders == 2 and len(task.models["value_controller"].encoders) == 2
    batch = task.collate(task.encode(rows(values=["0.2,0.6", [0.85, 0.1]])))
    assert batch["value_controller_inputs"].shape == (2, 2)
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], batch, NOISY, SIGMA)
        for i, values in enumerate([[0.2, 0.6], [0.85, 0.1]]):
            theirs = pipe.predict(NOISY[i : i + 1], SIGMA[i], pipeline_text(pipe, i, values), None, 1.0, 1.0)
            assert (ours[i : i + 1] - theirs).abs().max() <= 5e-6
    with pytest.raises(ConfigError, match="trains one AttriCtrl encoder, and the model files hold 2: pass only"):
        FluxTrainingTask(task.pipe, trained_model="value_controller")


def test_the_trained_encoder_gets_gradients_and_the_dit_none(task):
    trained = FluxTrainingTask(task.pipe, trained_model="value_controller", t5_sequence_length=T5_TOKENS)
    encoder, dit = trained.models["value_controller"], trained.pipe.dit
    batch = trained.collate(trained.encode(rows()))
    encoder.requires_grad_(True)
    try:
        assert encoder.gradient_checkpointing is False  # the trainer's --use_gradient_checkpointing sets it
        encoder.gradient_checkpointing = True
        trained.velocity(encoder, batch, NOISY, SIGMA).square().mean().backward()
        assert dit.gradient_checkpointing  # forwarded to the frozen DiT
        grads = {name: p.grad for name, p in encoder.named_parameters()}
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), list(grads)
        assert all(p.grad is None for p in dit.parameters())
    finally:
        encoder.requires_grad_(False).zero_grad(set_to_none=True)
        encoder.gradient_checkpointing = dit.gradient_checkpointing = False


# ------------------------------------------------------------------ errors
def test_clear_errors(task, repo, encoders):
    plain = load_task(repo)
    with pytest.raises(
        ConfigError, match="row 0 .*value_controller_inputs needs an AttriCtrl encoder among the models"
    ):
        plain.encode(rows())
    batch = task.collate(task.encode(rows()))
    with pytest.raises(ConfigError, match="1 value_controller_inputs per row, for 0 loaded AttriCtrl encoders"):
        plain.velocity(plain.models["dit"], batch, NOISY, SIGMA)
    with pytest.raises(ConfigError, match=r"row 0 .*: value_controller_inputs: value_controller_inputs\[0\]=1.5"):
        task.encode(rows(values=[1.5, 0.1]))
    with pytest.raises(ConfigError, match="has 2 values for 1 loaded AttriCtrl encoders"):
        task.encode(rows(values=[[0.1, 0.2], 0.1]))
    with pytest.raises(ConfigError, match="'bright' is not a number in"):
        task.encode(rows(values=["bright", 0.1]))
    with pytest.raises(ConfigError, match="trains one AttriCtrl encoder, and the model files hold 0: add"):
        load_task(repo, trained_model="value_controller")
    trained = FluxTrainingTask(task.pipe, trained_model="value_controller", t5_sequence_length=T5_TOKENS)
    without = [{k: v for k, v in row.items() if k != "value_controller_inputs"} for row in rows()]
    with pytest.raises(ConfigError, match="row 0 .* has no value_controller_inputs: training the AttriCtrl encoder"):
        trained.encode(without)
    with pytest.raises(ConfigError, match="training the AttriCtrl encoder needs batches with value_controller_inputs"):
        trained.velocity(trained.models["value_controller"], task.collate(task.encode(without)), NOISY, SIGMA)
    with pytest.raises(ConfigError, match="mixes 1 rows with value_controller_inputs and 1 without"):
        task.collate(task.encode([rows()[0], without[1]]))
    from PIL import Image

    entity = {"eligen_entity_prompts": ["a cat"], "eligen_entity_masks": [Image.new("RGB", (SIZE, SIZE), "white")]}
    with pytest.raises(ConfigError, match="has EliGen entities and value_controller_inputs"):
        task.encode([{**rows()[0], **entity}])


# ------------------------------------------------------------------ validation samples
def test_validation_samples_are_the_pipeline_with_the_values(task, pipe):
    size = {"height": 32, "width": 32, "num_inference_steps": 2}
    trained = FluxTrainingTask(
        task.pipe,
        trained_model="value_controller",
        validation_value_controller_inputs="0.7",
        t5_sequence_length=T5_TOKENS,
    )
    with torch.no_grad():
        ours = trained.sample(trained.models["value_controller"], PROMPTS[:1], seed=3, **size)[0]
        theirs = pipe(PROMPTS[0], seed=3, progress_bar=False, value_controller_inputs=0.7, **size)
        plain = pipe(PROMPTS[0], seed=3, progress_bar=False, **size)
    assert np.abs(np.asarray(ours, dtype=int) - np.asarray(theirs, dtype=int)).max() <= 1
    assert not np.array_equal(np.asarray(ours), np.asarray(plain))


# ------------------------------------------------------------------ the trainer
def write_dataset(folder: Path) -> Path:
    """DiffSynth-Studio's AttriCtrl layout: metadata.csv with image, prompt and value_controller_inputs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with (folder / "metadata.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "prompt", "value_controller_inputs"])
        for i, (prompt, value) in enumerate(zip(PROMPTS, VALUES, strict=True)):
            from PIL import Image

            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
            writer.writerow([f"img{i}.png", prompt, value])
    return folder


@pytest.mark.integration
def test_trainable_models_value_controller_trains_the_encoder_into_a_file_the_pipeline_loads(repo, encoders, tmp_path):
    """Through the trainer with `--trainable_models value_controller` (DiffSynth-Studio's full AttriCtrl recipe):
    two steps change the encoder and not the DiT; the saved file has the released keys and loads with
    `load_value_controller` as an encoder equal to the trained one."""
    from diffsynth.training.testing import tiny_config
    from diffsynth.training.trainer import TrainState, save, setup, train_step

    dataset = write_dataset(tmp_path / "data")
    options = dict(model_paths=[str(encoders[0])], trainable_models=["value_controller"], learning_rate=1e-2, seed=0)
    run = setup(tiny_config(repo, "flux", dataset, tmp_path / "out", use_gradient_checkpointing=True, **options))
    task = run.task
    encoder, dit = task.models["value_controller"], task.pipe.dit
    assert task.denoiser_slot == "value_controller" and isinstance(encoder, ValueEncoder)
    assert set(run.trainable) == {name for name, _ in encoder.named_parameters()}
    encoder_before = {k: v.clone() for k, v in encoder.state_dict().items()}
    dit_before = {k: v.clone() for k, v in dit.state_dict().items()}
    items = [run.dataset[i] for i in range(len(PROMPTS))]
    assert items[0]["value_controller_inputs"] == "0.2"  # the CSV cell, parsed by the task
    state = TrainState()
    for _ in range(2):
        state = train_step(run, state, [items])
    assert np.isfinite(state.loss) and state.loss > 0
    assert all(not torch.equal(v, encoder_before[k]) for k, v in encoder.state_dict().items())
    assert all(torch.equal(v, dit_before[k]) for k, v in dit.state_dict().items())
    save(run, state)
    saved_path = tmp_path / "out" / "step-000002" / "value_controller" / "diffusion_pytorch_model.safetensors"
    saved = load_file(str(saved_path))
    assert set(saved) == set(load_file(str(encoders[0])))  # the released file's keys
    pipe = load_pipe(repo)
    assert pipe.load_value_controller(str(saved_path)) == 0
    (loaded,) = pipe.value_controller.encoders
    assert loaded.config == encoder.config
    for key, value in encoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.integration
def test_cli_trains_the_encoder_with_validation_samples_and_a_dit_lora_under_it(repo, encoders, tmp_path):
    """`diffsynth-train` as users type it: the encoder file as --model_paths, `--trainable_models value_controller`
    with a validation sample at a value; the cached two-stage run (values cached, the encoder run in the training
    stage) gives the direct run's loss; the default DiT LoRA trains under the frozen encoder."""
    testing = pytest.importorskip("diffsynth.training.testing")
    dataset = write_dataset(tmp_path / "data")
    flags = ["--model_paths", str(encoders[0]), "--batch_size", "1", "--dataset_repeat", "2"]
    train = testing.CliTrainer(repo, "flux", dataset, *flags, "--trainable_models", "value_controller")
    validation = ["--validation_prompts", PROMPTS[0], "--task_options", "validation_value_controller_inputs=0.7"]
    validation += ["--validation_height", "32", "--validation_width", "32", "--validation_num_inference_steps", "2"]
    losses = train(tmp_path / "out", *validation)
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert (tmp_path / "out" / "validation" / "step-000002-0.png").is_file()
    direct, cached = train.direct_and_cached(tmp_path / "two-stage", "--max_steps", "1")
    stored = load_file(str(next((tmp_path / "two-stage" / "cache").rglob("*.safetensors"))))
    assert stored["value_controller_inputs"].shape == (1,)
    assert cached[0] == pytest.approx(direct[0], rel=1e-6, abs=1e-7)
    lora = testing.CliTrainer(repo, "flux", dataset, *flags)(tmp_path / "lora", "--max_steps", "1")
    assert len(lora) == 1 and np.isfinite(lora[0])
    assert (tmp_path / "lora" / "step-000001.safetensors").is_file()

"""FLUX.1 LoRA Encoder training (DiffSynth-Studio's full/FLUX.1-dev-LoRA-Encoder.sh): a row's `lora_encoder_inputs`
(LoRA files) are cached as their paths, the task's velocity appends the encoder's tokens of those LoRAs to the prompt
as the pipeline's `prepare_lora_encoding` does and runs the pipeline's per-step call, and the trainer trains the
encoder itself (`--trainable_models lora_encoder`, the DiT frozen) into a file `load_lora_encoder` reads strictly, or
a DiT LoRA under the frozen encoder.

The repo is conftest's tiny one at 32 T5 tokens (DiT width 256, 1 double + 2 single blocks); the encoder is a tiny one
of the DiT's layers (T5 width 32, one head, 4 probe tokens per layer) written as the released `model.safetensors`; the
LoRAs are random rank-2 peft files on every Linear of the DiT's blocks. The trainer tests are `integration` (they need
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

from diffsynth.flux.flux1.lora_encoder import FluxLoRAEncoder, LoRAEncoderConfig
from diffsynth.flux.pipeline import FluxImagePipeline
from diffsynth.flux.training import FluxTrainingTask
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.pipeline import configs_from_folder
from diffsynth.runtime.testing.weights import random_weights

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a cat on a sofa", "a lighthouse at dusk"]
T5_TOKENS = 32
SIZE = 64
ENCODER = LoRAEncoderConfig(1, 2, 256, 1024, dim=32, intermediate=64, head_dim=32, tokens_per_layer=4)
NOISY = torch.randn(2, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(1))
SIGMA = torch.tensor([0.7, 0.25])


def write_lora(dit, path: Path, seed: int) -> Path:
    """A random rank-2 peft LoRA (BFL names) on every Linear of the DiT's blocks."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in dit.named_modules():
        if isinstance(module, torch.nn.Linear) and "blocks." in name:
            state[f"{name}.lora_A.weight"] = torch.randn(2, module.in_features, generator=g) * 0.1
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=g) * 0.1
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def repo(tiny_repo, tmp_path_factory) -> Path:
    """The tiny FLUX.1 repo at 32 T5 tokens; the LoRA Encoder's `model.safetensors` and three LoRAs beside it."""
    root = shutil.copytree(tiny_repo, tmp_path_factory.mktemp("lora-encoder-train") / "repo")
    (root / "diffsynth.json").write_text(json.dumps({"defaults": {"t5_sequence_length": T5_TOKENS}}))
    encoder = random_weights(FluxLoRAEncoder(ENCODER), 4, scale=0.2)
    (root.parent / "LoRA-Encoder").mkdir()
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(encoder_path(root)))
    pipe = FluxImagePipeline.from_pretrained(str(root), torch_dtype="float32", device="cpu")
    for seed, path in enumerate(lora_paths(root), start=1):
        write_lora(pipe.dit, Path(path), seed)
    return root


def encoder_path(repo: Path) -> Path:
    return repo.parent / "LoRA-Encoder" / "model.safetensors"


def lora_paths(repo: Path) -> list[str]:
    return [str(repo.parent / f"style{i}.safetensors") for i in range(3)]


def load_task(repo, files=(), **kwargs) -> FluxTrainingTask:
    configs, tokenizer = configs_from_folder(repo)
    configs = [*configs, *(ModelConfig(path=str(f)) for f in files)]
    return FluxTrainingTask.from_pretrained(
        configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu", **kwargs
    )


@pytest.fixture(scope="module")
def task(repo) -> FluxTrainingTask:
    return load_task(repo, [encoder_path(repo)])


@pytest.fixture(scope="module")
def pipe(repo) -> FluxImagePipeline:
    pipe = FluxImagePipeline.from_pretrained(str(repo), torch_dtype="float32", device="cpu")
    pipe.load_lora_encoder(str(encoder_path(repo)))
    return pipe


def rows(repo, loras=None, seed: int = 0) -> list[dict]:
    """Rows as the dataset reads them: the image as a tensor, `lora_encoder_inputs` as the metadata's text."""
    loras = loras if loras is not None else lora_paths(repo)[:2]
    g = torch.Generator().manual_seed(seed)
    return [
        {"prompt": prompt, "image": torch.rand(3, SIZE, SIZE, generator=g) * 2 - 1, "lora_encoder_inputs": lora}
        for prompt, lora in zip(PROMPTS, loras, strict=True)
    ]


def pipeline_text(pipe, index: int, loras):
    """Row `index`'s prompt as the pipeline's denoise loop reads it: T5 states, then one token per LoRA."""
    return pipe.prepare_lora_encoding(loras, 1.0, pipe.encode_prompt(PROMPTS[index : index + 1], T5_TOKENS))


def dit_text(task, model, batch, noisy, sigma) -> torch.Tensor:
    """The text states the DiT reads in the task's velocity."""
    seen = []
    hook = task.pipe.dit.register_forward_pre_hook(lambda m, args: seen.append(args[2]))
    try:
        task.velocity(model, batch, noisy, sigma)
    finally:
        hook.remove()
    return seen[0]


# ------------------------------------------------------------------ encodings
def test_the_cache_keeps_the_lora_paths_and_the_dit_reads_the_pipelines_tokens(task, pipe, repo, monkeypatch):
    """A row's LoRA files (a path, a JSON list in a CSV cell, a path relative to the working directory) are cached as
    their absolute paths; the DiT then reads exactly the text `prepare_lora_encoding` gives the pipeline's DiT."""
    assert task.lora_encoder and task.models["lora_encoder"] is task.pipe.lora_encoder
    first, second, third = lora_paths(repo)
    monkeypatch.chdir(repo.parent)
    data = rows(repo, loras=["style0.safetensors", json.dumps([second, third])])
    samples = task.encode(data)
    decoded = [json.loads(bytes(s["lora_encoder_inputs"].tolist())) for s in samples]
    assert decoded == [[first], [second, third]]
    assert all(s["lora_encoder_inputs"].dtype == torch.uint8 for s in samples)
    with torch.no_grad():
        for i, loras in enumerate(([first], [second, third])):
            batch = task.collate([samples[i]])
            assert batch["lora_encoder_inputs"] == [loras]
            txt = dit_text(task, task.models["dit"], batch, NOISY[i : i + 1], SIGMA[i])
            want = pipeline_text(pipe, i, loras)
            assert txt.shape == (1, T5_TOKENS + len(loras), 32)
            assert torch.equal(txt, want.t5)
    # the encoding stage loads no encoder (its tokens are computed in the model call) but knows one is there
    encoding = load_task(repo, [encoder_path(repo)], denoiser=False)
    assert encoding.pipe.lora_encoder is None and encoding.lora_encoder
    again = encoding.encode(data)
    assert all(
        torch.equal(a["lora_encoder_inputs"], b["lora_encoder_inputs"]) for a, b in zip(again, samples, strict=True)
    )


# ------------------------------------------------------------------ the model call
def test_velocity_is_the_pipeline_per_step_call_with_the_lora_tokens(task, pipe, repo):
    """Row by row the task's velocity equals the pipeline's `predict` (embedded guidance 1) on the text
    `prepare_lora_encoding` gives: bit for bit for one row, float32 batching rounding for two; the same with the
    encoder as the trained model; another LoRA gives another prediction, and none the plain call."""
    loras = lora_paths(repo)[:2]
    batch = task.collate(task.encode(rows(repo)))
    assert batch["lora_encoder_inputs"] == [[loras[0]], [loras[1]]]
    trained = FluxTrainingTask(task.pipe, lora_encoder=True, trained_model="lora_encoder", t5_sequence_length=T5_TOKENS)
    assert trained.denoiser_slot == "lora_encoder"
    dit = task.models["dit"]
    with torch.no_grad():
        ours = task.velocity(dit, batch, NOISY, SIGMA)
        worst = 0.0
        for i in range(2):
            theirs = pipe.predict(NOISY[i : i + 1], SIGMA[i], pipeline_text(pipe, i, loras[i]), None, 1.0, 1.0)
            alone = task.velocity(dit, task.collate(task.encode(rows(repo)[i : i + 1])), NOISY[i : i + 1], SIGMA[i])
            assert torch.equal(alone, theirs)
            worst = max(worst, (ours[i : i + 1] - theirs).abs().max().item())
        assert worst <= 5e-6, worst  # measured: about 1.3e-6 (a batch of two vs. one row)
        assert torch.equal(trained.velocity(trained.models["lora_encoder"], batch, NOISY, SIGMA), ours)
        other = task.collate(task.encode(rows(repo, loras=lora_paths(repo)[1:])))
        assert (task.velocity(dit, other, NOISY, SIGMA) - ours).abs().max() > 1e-4
        plain = {k: v for k, v in batch.items() if k != "lora_encoder_inputs"}
        text = pipe.encode_prompt(PROMPTS, T5_TOKENS)
        assert torch.equal(task.velocity(dit, plain, NOISY, SIGMA), pipe.predict(NOISY, SIGMA, text, None, 1.0, 1.0))


def test_the_trained_encoder_gets_gradients_and_the_dit_none(task, repo):
    trained = FluxTrainingTask(task.pipe, lora_encoder=True, trained_model="lora_encoder", t5_sequence_length=T5_TOKENS)
    encoder, dit = trained.models["lora_encoder"], trained.pipe.dit
    batch = trained.collate(trained.encode(rows(repo)))
    encoder.requires_grad_(True)
    try:
        assert encoder.gradient_checkpointing is False  # the trainer's --use_gradient_checkpointing sets it
        encoder.gradient_checkpointing = True
        trained.velocity(encoder, batch, NOISY, SIGMA).square().mean().backward()
        assert dit.gradient_checkpointing  # handed to the frozen DiT
        grads = {name: p.grad for name, p in encoder.named_parameters()}
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), [
            n for n, g in grads.items() if g is None
        ]
        assert all(p.grad is None for p in dit.parameters())
    finally:
        encoder.requires_grad_(False).zero_grad(set_to_none=True)
        encoder.gradient_checkpointing = dit.gradient_checkpointing = False


# ------------------------------------------------------------------ errors
def test_clear_errors(task, repo, tmp_path):
    data = rows(repo)
    plain = load_task(repo)
    with pytest.raises(ConfigError, match="has lora_encoder_inputs, but no LoRA Encoder is among the models.*LoRA-Enc"):
        plain.encode(data)
    batch = task.collate(task.encode(data))
    with pytest.raises(ConfigError, match="this batch has lora_encoder_inputs, but no LoRA Encoder is loaded"):
        plain.velocity(plain.models["dit"], batch, NOISY, SIGMA)
    with pytest.raises(ConfigError, match="'nowhere.safetensors' is no file .*working directory"):
        task.encode([{**data[0], "lora_encoder_inputs": "nowhere.safetensors"}])
    with pytest.raises(ConfigError, match=r"'\[a.safetensors' is not a JSON list"):
        task.encode([{**data[0], "lora_encoder_inputs": "[a.safetensors"}])
    with pytest.raises(ConfigError, match="lora_encoder_inputs is an empty list"):
        task.encode([{**data[0], "lora_encoder_inputs": "[]"}])
    with pytest.raises(ConfigError, match="lora_encoder_inputs must name LoRA files, got 3"):
        task.encode([{**data[0], "lora_encoder_inputs": [3]}])
    with pytest.raises(ConfigError, match="trains the LoRA Encoder, and none is among the model files"):
        load_task(repo, trained_model="lora_encoder")
    trained = FluxTrainingTask(task.pipe, lora_encoder=True, trained_model="lora_encoder", t5_sequence_length=T5_TOKENS)
    without = [{k: v for k, v in row.items() if k != "lora_encoder_inputs"} for row in data]
    with pytest.raises(ConfigError, match="row 0 .* has no lora_encoder_inputs: training the LoRA Encoder"):
        trained.encode(without)
    with pytest.raises(ConfigError, match="training the LoRA Encoder needs batches with lora_encoder_inputs"):
        trained.velocity(trained.models["lora_encoder"], task.collate(task.encode(without)), NOISY, SIGMA)
    with pytest.raises(ConfigError, match="mixes 1 rows with lora_encoder_inputs and 1 without"):
        task.collate(task.encode([data[0], without[1]]))
    two = {**data[1], "lora_encoder_inputs": lora_paths(repo)[1:]}
    with pytest.raises(ConfigError, match=r"\[1, 2\] LoRA files in lora_encoder_inputs.*--batch_size 1"):
        task.collate(task.encode([data[0], two]))
    gone = shutil.copy(lora_paths(repo)[2], tmp_path / "gone.safetensors")
    cached = task.collate(task.encode([{**data[0], "lora_encoder_inputs": str(gone)}]))
    Path(gone).unlink()
    with pytest.raises(ConfigError, match="gone.safetensors .*is gone; put it back or encode the cache again"):
        task.velocity(task.models["dit"], cached, NOISY[:1], SIGMA[:1])


# ------------------------------------------------------------------ validation samples
def test_validation_samples_are_the_pipeline_with_the_lora(task, pipe, repo):
    size = {"height": 32, "width": 32, "num_inference_steps": 2}
    lora = lora_paths(repo)[0]
    trained = FluxTrainingTask(
        task.pipe,
        lora_encoder=True,
        trained_model="lora_encoder",
        validation_lora_encoder_inputs=lora,
        t5_sequence_length=T5_TOKENS,
    )
    with torch.no_grad():
        ours = trained.sample(trained.models["lora_encoder"], PROMPTS[:1], seed=3, **size)[0]
        theirs = pipe(PROMPTS[0], seed=3, progress_bar=False, lora_encoder_inputs=lora, **size)
        plain = pipe(PROMPTS[0], seed=3, progress_bar=False, **size)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    assert not np.array_equal(np.asarray(ours), np.asarray(plain))


# ------------------------------------------------------------------ the trainer
def write_dataset(folder: Path, repo: Path) -> Path:
    """DiffSynth-Studio's LoRA Encoder layout: metadata.csv with image, prompt and lora_encoder_inputs (a LoRA
    file's path; only `image` is a --data_file_keys column)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with (folder / "metadata.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "prompt", "lora_encoder_inputs"])
        for i, (prompt, lora) in enumerate(zip(PROMPTS, lora_paths(repo), strict=False)):
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
            writer.writerow([f"img{i}.png", prompt, lora])
    return folder


@pytest.mark.integration
def test_trainable_models_lora_encoder_trains_the_encoder_into_a_file_the_pipeline_loads(repo, tmp_path):
    """Through the trainer with DiffSynth-Studio's recipe (`--trainable_models lora_encoder`, the encoder file as
    --model_paths): two steps change every encoder weight and not the DiT; the saved file has the released keys,
    loads strictly with `load_lora_encoder`, and the pipeline then predicts what the trained encoder predicts."""
    from diffsynth.training.testing import tiny_config
    from diffsynth.training.trainer import TrainState, save, setup, train_step

    dataset = write_dataset(tmp_path / "data", repo)
    options = dict(model_paths=[str(encoder_path(repo))], trainable_models=["lora_encoder"], learning_rate=1e-2)
    run = setup(
        tiny_config(repo, "flux", dataset, tmp_path / "out", use_gradient_checkpointing=True, seed=0, **options)
    )
    task = run.task
    encoder, dit = task.models["lora_encoder"], task.pipe.dit
    assert task.denoiser_slot == "lora_encoder" and isinstance(encoder, FluxLoRAEncoder)
    assert set(run.trainable) == {name for name, _ in encoder.named_parameters()}
    encoder_before = {k: v.clone() for k, v in encoder.state_dict().items()}
    dit_before = {k: v.clone() for k, v in dit.state_dict().items()}
    items = [run.dataset[i] for i in range(len(PROMPTS))]
    assert items[0]["lora_encoder_inputs"] == lora_paths(repo)[0]  # the CSV cell, read by the task
    state = TrainState()
    for _ in range(2):
        state = train_step(run, state, [items])
    assert np.isfinite(state.loss) and state.loss > 0
    assert all(not torch.equal(v, encoder_before[k]) for k, v in encoder.state_dict().items())
    assert all(torch.equal(v, dit_before[k]) for k, v in dit.state_dict().items())
    save(run, state)
    saved_path = tmp_path / "out" / "step-000002" / "lora_encoder" / "diffusion_pytorch_model.safetensors"
    assert set(load_file(str(saved_path))) == set(load_file(str(encoder_path(repo))))  # the released keys
    pipe = FluxImagePipeline.from_pretrained(str(repo), torch_dtype="float32", device="cpu")
    pipe.load_lora_encoder(str(saved_path))
    assert pipe.lora_encoder.config == encoder.config
    for key, value in encoder.state_dict().items():
        assert torch.equal(pipe.lora_encoder.state_dict()[key], value), key
    batch = task.collate(task.encode(items))
    with torch.no_grad():
        trained = task.velocity(run.model, batch, NOISY, SIGMA)
        for i in range(2):
            loaded = pipe.predict(
                NOISY[i : i + 1], SIGMA[i], pipeline_text(pipe, i, lora_paths(repo)[i]), None, 1.0, 1.0
            )
            torch.testing.assert_close(loaded, trained[i : i + 1], rtol=0, atol=1e-5)
        pipe.load_lora_encoder(str(encoder_path(repo)))
        before = pipe.predict(NOISY[:1], SIGMA[:1], pipeline_text(pipe, 0, lora_paths(repo)[0]), None, 1.0, 1.0)
    assert (before - trained[:1]).abs().max() > 1e-5


@pytest.mark.integration
def test_trainer_trains_a_dit_lora_under_the_frozen_encoder(repo, pipe, tmp_path):
    """The default DiT LoRA through the trainer: two steps change only LoRA weights (the encoder stays frozen; the
    rows' LoRAs are read while the DiT carries the LoRA in training), and the pipeline with the saved LoRA predicts,
    with the row's `lora_encoder_inputs`, what the trained DiT predicts."""
    from diffsynth.training.testing import tiny_config
    from diffsynth.training.trainer import TrainState, save, setup, train_step

    dataset = write_dataset(tmp_path / "data", repo)
    config = tiny_config(repo, "flux", dataset, tmp_path / "out", model_paths=[str(encoder_path(repo))], seed=0)
    run = setup(config)
    dit, encoder = run.task.models["dit"], run.task.pipe.lora_encoder
    assert run.task.denoiser_slot == "dit" and run.trainable and all("lora_" in n for n in run.trainable)
    before = {name: p.detach().clone() for name, p in dit.named_parameters()}
    frozen = {name: p.detach().clone() for name, p in encoder.named_parameters()}
    items = [run.dataset[i] for i in range(len(PROMPTS))]
    state = TrainState()
    for _ in range(2):
        state = train_step(run, state, [items])
    assert np.isfinite(state.loss) and state.loss > 0
    changed = {name for name, p in dit.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora_" in name for name in changed)
    assert all(torch.equal(p, frozen[name]) for name, p in encoder.named_parameters())
    save(run, state)
    batch = run.task.collate(run.task.encode(items[:1]))
    text = pipeline_text(pipe, 0, lora_paths(repo)[0])
    with torch.no_grad():
        trained = run.task.velocity(run.model, batch, NOISY[:1], SIGMA[:1])
        base = pipe.predict(NOISY[:1], SIGMA[:1], text, None, 1.0, 1.0)
        pipe.load_lora(tmp_path / "out" / "step-000002.safetensors", fuse=False, name="trained")
        try:
            applied = pipe.predict(NOISY[:1], SIGMA[:1], text, None, 1.0, 1.0)
        finally:
            pipe.clear_loras()
    torch.testing.assert_close(applied, trained, rtol=0, atol=1e-5)
    assert (applied - base).abs().max() > 1e-5


@pytest.mark.integration
def test_cli_cached_two_stage_equals_direct_and_a_dit_lora_under_the_frozen_encoder(repo, tmp_path):
    """`diffsynth-train` as users type it: the cached two-stage run of the encoder's training (the LoRA paths
    cached; the encoder run in the training stage) gives the direct run's losses; the default DiT LoRA trains under
    the frozen encoder."""
    testing = pytest.importorskip("diffsynth.training.testing")
    dataset = write_dataset(tmp_path / "data", repo)
    flags = ["--model_paths", str(encoder_path(repo)), "--batch_size", "1"]
    train = testing.CliTrainer(repo, "flux", dataset, *flags, "--trainable_models", "lora_encoder")
    direct, cached = train.direct_and_cached(tmp_path / "two-stage", "--max_steps", "2")
    stored = load_file(str(tmp_path / "two-stage" / "cache" / "items" / "000000.safetensors"))
    assert json.loads(bytes(stored["lora_encoder_inputs"].tolist())) in ([p] for p in lora_paths(repo)[:2])
    assert len(direct) == 2 and cached == pytest.approx(direct, rel=1e-6, abs=1e-7)
    lora = testing.CliTrainer(repo, "flux", dataset, *flags)(tmp_path / "lora", "--max_steps", "1")
    assert len(lora) == 1 and np.isfinite(lora[0])
    assert (tmp_path / "lora" / "step-000001.safetensors").is_file()

"""FLUX.1 IP-Adapter training (DiffSynth-Studio's lora/ and full/FLUX.1-dev-IP-Adapter.sh): a row's
`ipadapter_images` are cached as the image encoder's vectors the pipeline's `prepare_ip_adapter` computes, the task's
velocity is the pipeline's per-step call with the adapter's keys/values of them, and the trainer trains the adapter
itself (`--trainable_models ipadapter`, the DiT frozen) into a file `load_ip_adapter` reads strictly, or a DiT LoRA
under the frozen adapter.

The repo is conftest's tiny one at 32 T5 tokens (DiT width 256, 1 double + 2 single blocks); the SigLIP tower is tiny
(32x32 input, width 32) and the adapter an InstantX-format one of its sizes (3 tokens per picture), written as
InstantX's pickle. The trainer tests are `integration` (they need diffsynth-training installed).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffsynth.flux.flux1.ip_adapter import INSTANTX, FluxIPAdapter, FluxIPAdapterConfig
from diffsynth.flux.pipeline import FluxImagePipeline
from diffsynth.flux.training import FluxTrainingTask
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import pil_to_tensor, tensor_to_pil
from diffsynth.runtime.pipeline import configs_from_folder
from diffsynth.runtime.testing.weights import random_weights

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle", "a yellow triangle over a blue sea"]
T5_TOKENS = 32
SIZE = 64
SIGLIP = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)
ADAPTER = FluxIPAdapterConfig(INSTANTX, 32, 32, 3, 256, 1, 2)  # the tiny DiT's width and blocks, T5 width 32
NOISY = torch.randn(2, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(1))
SIGMA = torch.tensor([0.8, 0.35])


def instantx_file(adapter: FluxIPAdapter, path: Path) -> Path:
    """The adapter saved as InstantX's `ip-adapter.bin`: a pickle of {"image_proj": {...}, "ip_adapter": {...}}."""
    groups: dict[str, dict] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in adapter.state_dict().items():
        group, rest = key.split(".", 1)
        groups[group][rest] = value.clone()
    torch.save(groups, path)
    return path


@pytest.fixture(scope="module")
def repo(tiny_repo, tmp_path_factory) -> Path:
    """The tiny FLUX.1 repo at 32 T5 tokens, with a tiny SigLIP tower and an InstantX adapter beside it."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    root = shutil.copytree(tiny_repo, tmp_path_factory.mktemp("ip-train") / "repo")
    (root / "diffsynth.json").write_text(json.dumps({"defaults": {"t5_sequence_length": T5_TOKENS}}))
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**SIGLIP)).save_pretrained(root.parent / "siglip")
    norm = lambda name, p: name.endswith("norm.weight")  # noqa: E731
    adapter = random_weights(FluxIPAdapter(ADAPTER), 5, scale=0.3, is_norm=norm)
    instantx_file(adapter, root.parent / "ip-adapter.bin")
    return root


def ip_paths(repo: Path) -> list[str]:
    """The two files DiffSynth-Studio lists: the adapter and its image encoder."""
    return [str(repo.parent / "ip-adapter.bin"), str(repo.parent / "siglip")]


def load_task(repo, files=(), **kwargs) -> FluxTrainingTask:
    configs, tokenizer = configs_from_folder(repo)
    configs = [*(ModelConfig(path=f) for f in files), *configs]
    return FluxTrainingTask.from_pretrained(
        configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu", **kwargs
    )


@pytest.fixture(scope="module")
def task(repo) -> FluxTrainingTask:
    return load_task(repo, ip_paths(repo))


@pytest.fixture(scope="module")
def pipe(repo) -> FluxImagePipeline:
    pipe = FluxImagePipeline.from_pretrained(str(repo), torch_dtype="float32", device="cpu")
    pipe.load_ip_adapter(*ip_paths(repo))
    return pipe


def picture(seed: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def references(index: int) -> list[Image.Image]:
    """Row `index`'s reference pictures: one for the first row, two of other sizes for the second."""
    return [picture(index, 48, 40)] if index == 0 else [picture(7, 40, 56), picture(8, 64, 32)]


def rows(seed: int = 0) -> list[dict]:
    """Rows as the dataset reads them: the image and the references (at their own sizes) as [3, H, W] tensors."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, prompt in enumerate(PROMPTS):
        refs = [pil_to_tensor(p)[0] for p in references(i)]
        image = torch.rand(3, SIZE, SIZE, generator=g) * 2 - 1
        out.append({"prompt": prompt, "image": image, "ipadapter_images": refs[0] if i == 0 else refs})
    return out


def pipeline_embeds(pipe, images) -> torch.Tensor:
    """The image vectors the pipeline's `prepare_ip_adapter` hands its adapter."""
    seen = []
    hook = pipe.ipadapter.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        pipe.prepare_ip_adapter(pipe.check_ip_adapter_inputs(images, 1.0), 1.0, False)
    finally:
        hook.remove()
    return seen[0]


def pipeline_velocity(pipe, index: int, noisy, sigma) -> torch.Tensor:
    """The pipeline's denoise step (embedded guidance 1, no CFG) for row `index` with its references."""
    text = pipe.encode_prompt(PROMPTS[index : index + 1], T5_TOKENS)
    keys, _ = pipe.prepare_ip_adapter(pipe.check_ip_adapter_inputs(references(index), 1.0), 1.0, False)
    return pipe.predict(noisy, sigma, text, None, 1.0, 1.0, ip_adapter=(keys, None))


# ------------------------------------------------------------------ encodings
def test_references_are_cached_as_the_pipelines_image_vectors(task, pipe, repo):
    """The cache holds the image encoder's vectors (one per picture), bit for bit those the pipeline computes; the
    encoding stage loads the encoder alone, the training stage the adapter alone."""
    assert task.ip_adapter and "ipadapter_images" in task.conditioning
    assert task.validation_references == "expected"
    assert not any(p.requires_grad for p in task.pipe.ipadapter.parameters())
    data = rows()
    samples = task.encode(data)
    for i, sample in enumerate(samples):
        want = pipeline_embeds(pipe, references(i))
        assert sample["ipadapter_embeds"].shape == (len(references(i)), 32)
        assert sample["ipadapter_embeds"].dtype == torch.float32
        assert torch.equal(sample["ipadapter_embeds"], want)
    # a PIL reference (a caller's rows) gives the dataset tensor's encoding
    as_pil = {**data[0], "ipadapter_images": references(0)[0]}
    assert torch.equal(task.encode([as_pil])[0]["ipadapter_embeds"], samples[0]["ipadapter_embeds"])
    encoding = load_task(repo, ip_paths(repo), denoiser=False)
    assert encoding.pipe.ipadapter is None and encoding.pipe.ipadapter_image_encoder is not None
    assert encoding.conditioning == task.conditioning
    again = encoding.encode(data)
    assert all(torch.equal(a["ipadapter_embeds"], b["ipadapter_embeds"]) for a, b in zip(again, samples, strict=True))
    training = load_task(repo, ip_paths(repo)[:1], encoders=False)  # the adapter alone: no encoder needed
    assert training.pipe.ipadapter is not None and training.pipe.ipadapter_image_encoder is None
    for key, value in task.pipe.ipadapter.state_dict().items():
        assert torch.equal(training.pipe.ipadapter.state_dict()[key], value), key


# ------------------------------------------------------------------ the model call
def test_velocity_is_the_pipeline_per_step_call_with_the_adapter(task, pipe):
    """Row by row the task's velocity equals the pipeline's `predict` with the keys/values `prepare_ip_adapter`
    makes of the row's references: bit for bit for one row, float32 batching rounding for two; the same with the
    adapter as the trained model; without the references it is another."""
    data = rows()
    data[1]["ipadapter_images"] = data[1]["ipadapter_images"][:1]  # one picture each: a batch of two
    batch = task.collate(task.encode(data))
    assert batch["ipadapter_embeds"].shape == (2, 1, 32)
    dit = task.models["dit"]
    trained = FluxTrainingTask(task.pipe, ip_adapter=True, trained_model="ipadapter", t5_sequence_length=T5_TOKENS)
    assert trained.denoiser_slot == "ipadapter" and trained.models["ipadapter"] is task.pipe.ipadapter
    with torch.no_grad():
        ours = task.velocity(dit, batch, NOISY, SIGMA)
        worst = 0.0
        for i in range(2):
            text = pipe.encode_prompt(PROMPTS[i : i + 1], T5_TOKENS)
            images = references(i)[:1]
            keys, _ = pipe.prepare_ip_adapter(pipe.check_ip_adapter_inputs(images, 1.0), 1.0, False)
            theirs = pipe.predict(NOISY[i : i + 1], SIGMA[i], text, None, 1.0, 1.0, ip_adapter=(keys, None))
            alone = task.velocity(dit, task.collate(task.encode([data[i]])), NOISY[i : i + 1], SIGMA[i])
            assert torch.equal(alone, theirs)  # one row: the same call, bit for bit
            worst = max(worst, (ours[i : i + 1] - theirs).abs().max().item())
        assert worst <= 5e-6, worst  # measured: about 1.4e-6 (a batch of two vs. one row)
        two = task.collate(task.encode([rows()[1]]))  # two pictures: their tokens side by side
        assert torch.equal(
            task.velocity(dit, two, NOISY[1:], SIGMA[1]), pipeline_velocity(pipe, 1, NOISY[1:], SIGMA[1])
        )
        assert torch.equal(trained.velocity(trained.models["ipadapter"], batch, NOISY, SIGMA), ours)
        plain = {k: v for k, v in batch.items() if k != "ipadapter_embeds"}
        without = task.velocity(dit, plain, NOISY, SIGMA)
        assert torch.equal(without, pipe.predict(NOISY, SIGMA, pipe.encode_prompt(PROMPTS, T5_TOKENS), None, 1.0, 1.0))
        assert (without - ours).abs().max() > 1e-4


def test_the_trained_adapter_gets_gradients_and_the_dit_none(task):
    trained = FluxTrainingTask(task.pipe, ip_adapter=True, trained_model="ipadapter", t5_sequence_length=T5_TOKENS)
    adapter, dit = trained.models["ipadapter"], trained.pipe.dit
    batch = trained.collate(trained.encode(rows()[:1]))
    adapter.requires_grad_(True)
    try:
        assert adapter.gradient_checkpointing is False  # the trainer's --use_gradient_checkpointing sets it
        adapter.gradient_checkpointing = True
        trained.velocity(adapter, batch, NOISY[:1], SIGMA[:1]).square().mean().backward()
        assert dit.gradient_checkpointing  # handed to the frozen DiT
        grads = {name: p.grad for name, p in adapter.named_parameters()}
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), list(grads)
        assert all(p.grad is None for p in dit.parameters())
        assert all(p.grad is None for p in trained.pipe.ipadapter_image_encoder.parameters())
    finally:
        adapter.requires_grad_(False).zero_grad(set_to_none=True)
        adapter.gradient_checkpointing = dit.gradient_checkpointing = False


def test_a_trained_xlabs_adapter_is_written_in_xlabs_names(task, tmp_path):
    """`export_state` writes an XLabs adapter in XLabs' names (InstantX's are ours already), and the written file
    loads strictly as the same adapter."""
    from safetensors.torch import save_file

    from diffsynth.flux.flux1.ip_adapter import XLABS, load_ip_adapter_model

    norm = lambda name, p: name.endswith("norm.weight")  # noqa: E731
    xlabs = random_weights(FluxIPAdapter(FluxIPAdapterConfig(XLABS, 16, 32, 4, 256, 1, 0)), 2, scale=0.3, is_norm=norm)
    instantx = task.pipe.ipadapter.state_dict()
    assert task.export_state("ipadapter", instantx) is instantx
    with task.pipe.using("ipadapter", xlabs):
        exported = dict(task.export_state("ipadapter", xlabs.state_dict()))
    assert "ip_adapter_proj_model.proj.weight" in exported
    assert "double_blocks.0.processor.ip_adapter_double_stream_k_proj.bias" in exported
    save_file({k: v.contiguous() for k, v in exported.items()}, str(tmp_path / "ip_adapter.safetensors"))
    loaded = load_ip_adapter_model(str(tmp_path / "ip_adapter.safetensors"), double_blocks=1)
    assert loaded.config == xlabs.config
    for key, value in xlabs.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# ------------------------------------------------------------------ errors
def test_clear_errors(task, repo):
    row = rows()[0]
    plain = load_task(repo)
    assert not plain.ip_adapter and "ipadapter_images" not in plain.conditioning
    with pytest.raises(
        ConfigError, match="has ipadapter_images, but no IP-Adapter is among the models.*ip-adapter.bin"
    ):
        plain.encode([row])
    batch = task.collate(task.encode([row]))
    with pytest.raises(ConfigError, match="has ipadapter_images, but no IP-Adapter is loaded"):
        plain.velocity(plain.models["dit"], batch, NOISY[:1], SIGMA[:1])
    with pytest.raises(ConfigError, match="encoded into 5-wide vectors, and the IP-Adapter takes 32"):
        task.velocity(task.models["dit"], {**batch, "ipadapter_embeds": torch.zeros(1, 1, 5)}, NOISY[:1], SIGMA[:1])
    with pytest.raises(ConfigError, match=r"ipadapter_images is the path 'ref.png'.*--data_file_keys"):
        task.encode([{**row, "ipadapter_images": "ref.png"}])
    with pytest.raises(ConfigError, match=r"ipadapter_images\[1\] must be one image .*got \(2, 8\)"):
        task.encode([{**row, "ipadapter_images": [row["ipadapter_images"], torch.zeros(2, 8)]}])
    with pytest.raises(ConfigError, match="trains a FLUX.1 IP-Adapter, and none is among the model files"):
        load_task(repo, trained_model="ipadapter")
    with pytest.raises(ConfigError, match="needs its image encoder among the models.*siglip"):
        load_task(repo, ip_paths(repo)[:1])
    without = {k: v for k, v in row.items() if k != "ipadapter_images"}
    trained = FluxTrainingTask(task.pipe, ip_adapter=True, trained_model="ipadapter", t5_sequence_length=T5_TOKENS)
    with pytest.raises(ConfigError, match="row 0 .* has no ipadapter_images: training the IP-Adapter"):
        trained.encode([without])
    with pytest.raises(ConfigError, match="training the IP-Adapter needs batches with ipadapter_images"):
        trained.velocity(trained.models["ipadapter"], task.collate(task.encode([without])), NOISY[:1], SIGMA[:1])
    with pytest.raises(ConfigError, match="mixes 1 rows with ipadapter_images and 1 without"):
        task.collate(task.encode([row, without]))
    with pytest.raises(ConfigError, match=r"have \[1, 2\] ipadapter_images.*--batch_size 1"):
        task.collate(task.encode(rows()))


# ------------------------------------------------------------------ validation samples
def test_validation_samples_take_the_references_as_ipadapter_images(task, pipe):
    size = {"height": 32, "width": 32, "num_inference_steps": 2}
    trained = FluxTrainingTask(task.pipe, ip_adapter=True, trained_model="ipadapter", t5_sequence_length=T5_TOKENS)
    reference = references(0)
    assert trained.reference_arguments(reference) == {"ipadapter_images": reference}
    with torch.no_grad():
        ours = trained.sample(trained.models["ipadapter"], PROMPTS[:1], seed=3, references=[reference], **size)[0]
        theirs = pipe(PROMPTS[0], seed=3, progress_bar=False, ipadapter_images=reference, **size)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


# ------------------------------------------------------------------ the trainer
def write_dataset(folder: Path) -> Path:
    """DiffSynth-Studio's FLUX.1-dev-IP-Adapter layout: metadata.csv with image, prompt and ipadapter_images."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["image,prompt,ipadapter_images"]
    for i, prompt in enumerate(PROMPTS):
        picture(10 + i, SIZE, SIZE).save(folder / f"img{i}.png")
        picture(i, 48 + 16 * i, 40).save(folder / f"ref{i}.png")
        lines.append(f"img{i}.png,{prompt},ref{i}.png")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.integration
def test_trainable_models_ipadapter_trains_the_adapter_into_a_file_load_ip_adapter_reads(repo, tmp_path):
    """Through the trainer with DiffSynth-Studio's full recipe (`--trainable_models ipadapter`, `--data_file_keys
    image,ipadapter_images`, the two files as --model_paths): the dataset reads each reference at its own size, two
    steps change every adapter weight and nothing else; the saved file has the released keys, loads strictly with
    `load_ip_adapter` and the pipeline then predicts what the trained adapter predicts."""
    from diffsynth.training.testing import tiny_config
    from diffsynth.training.trainer import TrainState, save, setup, train_step

    dataset = write_dataset(tmp_path / "data")
    config = tiny_config(
        repo, "flux", dataset, tmp_path / "out", model_paths=ip_paths(repo), trainable_models=["ipadapter"],
        data_file_keys=["image", "ipadapter_images"], batch_size=1, learning_rate=1e-2, seed=0,
        use_gradient_checkpointing=True,
    )  # fmt: skip
    run = setup(config)
    task = run.task
    adapter, dit, encoder = task.models["ipadapter"], task.pipe.dit, task.pipe.ipadapter_image_encoder
    assert task.denoiser_slot == "ipadapter" and isinstance(adapter, FluxIPAdapter)
    assert set(run.trainable) == {name for name, _ in adapter.named_parameters()}
    items = [run.dataset[i] for i in range(len(PROMPTS))]
    assert items[1]["ipadapter_images"].shape == (3, 32, 64) and items[1]["image"].shape == (3, SIZE, SIZE)
    adapter_before = {k: v.clone() for k, v in adapter.state_dict().items()}
    frozen = {k: v.clone() for model in (dit, encoder) for k, v in model.state_dict().items()}
    state = TrainState()
    for item in items:
        state = train_step(run, state, [[item]])
    assert np.isfinite(state.loss) and state.loss > 0
    assert all(not torch.equal(v, adapter_before[k]) for k, v in adapter.state_dict().items())
    after = {k: v for model in (dit, encoder) for k, v in model.state_dict().items()}
    assert all(torch.equal(v, frozen[k]) for k, v in after.items())
    save(run, state)
    saved_path = tmp_path / "out" / "step-000002" / "ipadapter" / "diffusion_pytorch_model.safetensors"
    saved = load_file(str(saved_path))
    released = torch.load(ip_paths(repo)[0], weights_only=True)
    assert set(saved) == {f"{group}.{key}" for group, part in released.items() for key in part}
    pipe = FluxImagePipeline.from_pretrained(str(repo), torch_dtype="float32", device="cpu")
    pipe.load_ip_adapter(str(saved_path), image_encoder=ip_paths(repo)[1])
    assert pipe.ipadapter.config == ADAPTER
    for key, value in adapter.state_dict().items():
        assert torch.equal(pipe.ipadapter.state_dict()[key], value), key
    batch = task.collate(task.encode([items[0]]))
    reference = tensor_to_pil(items[0]["ipadapter_images"])[0]  # as the dataset read it
    text = pipe.encode_prompt(PROMPTS[:1], T5_TOKENS)
    with torch.no_grad():
        trained = task.velocity(run.model, batch, NOISY[:1], SIGMA[:1])
        keys, _ = pipe.prepare_ip_adapter([reference], 1.0, False)
        loaded = pipe.predict(NOISY[:1], SIGMA[:1], text, None, 1.0, 1.0, ip_adapter=(keys, None))
        base = FluxImagePipeline.from_pretrained(str(repo), torch_dtype="float32", device="cpu")
        base.load_ip_adapter(*ip_paths(repo))
        keys, _ = base.prepare_ip_adapter([reference], 1.0, False)
        before = base.predict(NOISY[:1], SIGMA[:1], text, None, 1.0, 1.0, ip_adapter=(keys, None))
    torch.testing.assert_close(loaded, trained, rtol=0, atol=1e-5)
    assert (loaded - before).abs().max() > 1e-4


@pytest.mark.integration
def test_trainer_trains_a_dit_lora_under_the_frozen_adapter(repo, pipe, tmp_path):
    """DiffSynth-Studio's LoRA recipe through the trainer (the default DiT LoRA): two steps change only LoRA weights
    (the adapter and its encoder stay frozen), and the pipeline with the saved LoRA and the adapter predicts what
    the trained DiT predicts."""
    from diffsynth.training.testing import tiny_config
    from diffsynth.training.trainer import TrainState, save, setup, train_step

    dataset = write_dataset(tmp_path / "data")
    config = tiny_config(
        repo, "flux", dataset, tmp_path / "out", model_paths=ip_paths(repo),
        data_file_keys=["image", "ipadapter_images"], batch_size=1, seed=0,
    )  # fmt: skip
    run = setup(config)
    dit, adapter = run.task.models["dit"], run.task.pipe.ipadapter
    assert run.task.denoiser_slot == "dit" and run.trainable and all("lora_" in n for n in run.trainable)
    before = {name: p.detach().clone() for name, p in dit.named_parameters()}
    frozen = {name: p.detach().clone() for name, p in adapter.named_parameters()}
    items = [run.dataset[i] for i in range(len(PROMPTS))]
    state = TrainState()
    for item in items:
        state = train_step(run, state, [[item]])
    assert np.isfinite(state.loss) and state.loss > 0
    changed = {name for name, p in dit.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora_" in name for name in changed)
    assert all(torch.equal(p, frozen[name]) for name, p in adapter.named_parameters())
    save(run, state)
    batch = run.task.collate(run.task.encode([items[0]]))
    reference = tensor_to_pil(items[0]["ipadapter_images"])[0]
    text = pipe.encode_prompt(PROMPTS[:1], T5_TOKENS)
    with torch.no_grad():
        trained = run.task.velocity(run.model, batch, NOISY[:1], SIGMA[:1])
        keys, _ = pipe.prepare_ip_adapter([reference], 1.0, False)
        base = pipe.predict(NOISY[:1], SIGMA[:1], text, None, 1.0, 1.0, ip_adapter=(keys, None))
        pipe.load_lora(tmp_path / "out" / "step-000002.safetensors", fuse=False, name="ip")
        try:
            applied = pipe.predict(NOISY[:1], SIGMA[:1], text, None, 1.0, 1.0, ip_adapter=(keys, None))
        finally:
            pipe.clear_loras()
    torch.testing.assert_close(applied, trained, rtol=0, atol=1e-5)
    assert (applied - base).abs().max() > 1e-5


@pytest.mark.integration
def test_cli_dit_lora_under_the_frozen_adapter_and_the_cached_two_stage_run(repo, tmp_path):
    """`diffsynth-train` as users type it: DiffSynth-Studio's LoRA recipe (the default DiT LoRA, the adapter frozen)
    writes a LoRA; the cached two-stage run of the adapter's full training (image vectors cached; the adapter, no
    encoder, in the training stage) gives the direct run's losses."""
    testing = pytest.importorskip("diffsynth.training.testing")
    dataset = write_dataset(tmp_path / "data")
    flags = ["--model_paths", ",".join(ip_paths(repo)), "--data_file_keys", "image,ipadapter_images"]
    flags += ["--batch_size", "1"]
    lora = testing.CliTrainer(repo, "flux", dataset, *flags)(tmp_path / "lora", "--max_steps", "1")
    assert len(lora) == 1 and np.isfinite(lora[0])
    assert (tmp_path / "lora" / "step-000001.safetensors").is_file()
    train = testing.CliTrainer(repo, "flux", dataset, *flags, "--trainable_models", "ipadapter")
    direct, cached = train.direct_and_cached(tmp_path / "two-stage", "--max_steps", "2")
    stored = load_file(str(tmp_path / "two-stage" / "cache" / "items" / "000000.safetensors"))
    assert stored["ipadapter_embeds"].shape == (1, 32)
    assert len(direct) == 2 and cached == pytest.approx(direct, rel=1e-6, abs=1e-7)

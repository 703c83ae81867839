"""`--offload_models`: the named model is loaded into CPU memory and never moved to the training device whole (no
`.to(device)` of it or of any module holding its frozen weights, accelerate's `prepare` included), while the other
models are placed as usual; its LoRA lives on the device outside the VRAM manager's units, and the run trains
exactly as with a resident base. More than one process is refused by name."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffsynth_training_toy import TASK, ToyTask
from torch import nn

from diffsynth.runtime import loading
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.vram import vram_handle
from diffsynth.runtime.vram.parked import ParkedWeight
from diffsynth.training import trainer
from diffsynth.training.config import TrainConfig
from diffsynth.training.data import batch_plan
from diffsynth.training.offload import check_processes
from diffsynth.training.testing import first_losses, tiny_config


@pytest.fixture
def moves(monkeypatch) -> list[nn.Module]:
    """Every module `.to(...)` was called on with a device, except while the loader builds a model in CPU memory
    (`loading.load_models` places each model it builds on "cpu"), in order."""
    called: list[nn.Module] = []
    building = []
    to, load_models = nn.Module.to, loading.load_models

    def spy_to(self, *args, **kwargs):
        if not building and torch._C._nn._parse_to(*args, **kwargs)[0] is not None:
            called.append(self)
        return to(self, *args, **kwargs)

    def spy_load(*args, **kwargs):
        building.append(True)
        try:
            return load_models(*args, **kwargs)
        finally:
            building.clear()

    monkeypatch.setattr(nn.Module, "to", spy_to)
    monkeypatch.setattr(loading, "load_models", spy_load)
    return called


def _moved_with_frozen_weights(model: nn.Module, moves: list[nn.Module]) -> list[str]:
    """The modules of `model` moved with `.to(device)` that hold frozen weights (peft moves only its new adapter
    layers, which train)."""
    names = {id(m): name or type(m).__name__ for name, m in model.named_modules()}
    return [
        names[id(m)] for m in moves if id(m) in names and any(not p.requires_grad for p in m.parameters(recurse=True))
    ]


@pytest.mark.integration
@pytest.mark.parametrize("lora_type", ["lora", "dora", "lokr"])
def test_offloaded_dit_is_never_on_the_device_whole_and_trains_as_resident(
    z_image_repo, z_image_dataset, tmp_path, moves, lora_type
):
    settings = dict(learning_rate=1e-3, lora_type=lora_type)
    plain, resident = first_losses(
        tiny_config(z_image_repo, "z_image", z_image_dataset, tmp_path / "plain", **settings)
    )
    moves.clear()
    streamed, run = first_losses(
        tiny_config(z_image_repo, "z_image", z_image_dataset, tmp_path / "off", offload_models=["dit"], **settings)
    )
    dit, device = run.task.models["dit"], run.accelerator.device
    assert _moved_with_frozen_weights(dit, moves) == []  # neither placement nor accelerate's prepare moved it
    for slot in ("text_encoder", "vae"):  # the other models were placed on the device as always
        assert any(m is run.task.models[slot] for m in moves), slot

    handle = vram_handle(dit)
    assert handle is not None and handle.plan.streamed and not handle.plan.resident
    targets = {id(t.param) for u in handle.units for t in u.targets}
    assert targets and all(isinstance(t.placeholder, ParkedWeight) for u in handle.units for t in u.targets)
    assert run.trainable and not any(id(p) in targets for p in run.trainable.values())
    for name, p in run.trainable.items():  # the LoRA: real tensors on the training device
        assert p.device == device and not isinstance(p, ParkedWeight), name
    outside = [p for _, p in handle._resident_params] + [getattr(m, a) for m, a in handle._buffers]
    assert outside and all(t.device == device and not isinstance(t, ParkedWeight) for t in outside)

    assert streamed == plain
    for name, p in run.trainable.items():
        assert torch.equal(p, resident.trainable[name]), name


def _accelerator(kind: str, processes: int) -> SimpleNamespace:
    return SimpleNamespace(distributed_type=f"DistributedType.{kind}", num_processes=processes)


def test_offload_refuses_more_than_one_process_and_sharding(tmp_path, dataset, monkeypatch):
    cfg = TrainConfig(family=TASK, dataset_base_path=str(dataset), output_path=str(tmp_path), offload_models=["x"])
    for kind, processes in (("MULTI_GPU", 2), ("MULTI_CPU", 4), ("FSDP", 1), ("DEEPSPEED", 2)):
        with pytest.raises(ConfigError, match=rf"--offload_models x: .* one process only; this run has {processes}"):
            check_processes(cfg, _accelerator(kind, processes))
    check_processes(cfg, _accelerator("NO", 1))
    check_processes(TrainConfig(family=TASK, dataset_base_path=str(dataset)), _accelerator("MULTI_GPU", 2))

    # the trainer refuses before loading anything
    monkeypatch.setattr(trainer, "make_accelerator", lambda cfg, **kwargs: _accelerator("MULTI_GPU", 2))
    ToyTask.builds.clear()
    with pytest.raises(ConfigError, match="--offload_models denoiser: .* one process only; this run has 2"):
        trainer.setup(TrainConfig(family=TASK, dataset_base_path=str(dataset), offload_models=["denoiser"]))
    assert ToyTask.builds == []


def test_diffsynth_studios_flag_offloads_the_trained_model(tmp_path, dataset):
    """`--enable_model_cpu_offload` (DiffSynth-Studio's name) is `--offload_models` with the denoiser."""
    cfg = TrainConfig(
        family=TASK, dataset_base_path=str(dataset), output_path=str(tmp_path), enable_model_cpu_offload=True,
        max_pixels=64 * 64, bucket_step=16, batch_size=2, lora_rank=4, mixed_precision="no", dtype="float32",
    )  # fmt: skip
    run = trainer.setup(cfg)
    assert run.config.offload_models == ["denoiser"]
    handle = vram_handle(run.task.models["denoiser"])
    assert handle is not None and handle.plan.streamed
    with pytest.raises(ConfigError, match="--enable_model_cpu_offload streams the frozen base of a LoRA"):
        TrainConfig(
            family=TASK, dataset_base_path=str(dataset), enable_model_cpu_offload=True, trainable_models=["denoiser"]
        ).check()


@pytest.mark.integration
def test_validation_samples_with_the_streamed_dit_and_training_goes_on(z_image_repo, z_image_dataset, tmp_path):
    """The pipeline's stages activate and park the trainer's streamed DiT (it cannot be moved with `.to`): the
    validation picture equals a resident run's, and the step after it too."""
    from PIL import Image

    pictures, losses = [], []
    for name, offload_models in (("plain", []), ("off", ["dit"])):
        cfg = tiny_config(
            z_image_repo, "z_image", z_image_dataset, tmp_path / name, offload_models=offload_models,
            validation_prompts=["a red circle"], validation_height=32, validation_width=32,
            validation_num_inference_steps=2,
        )  # fmt: skip
        first, run = first_losses(cfg)
        (path,) = trainer.validate(run, trainer.TrainState(step=2))
        pictures.append(np.asarray(Image.open(path)))
        batch = batch_plan(run.dataset.batch_keys, batch_size=2)[0]
        state = trainer.train_step(run, trainer.TrainState(step=2), [[run.dataset[i] for i in batch]])
        losses.append([*first, state.loss])
    assert losses[1] == losses[0]
    assert np.array_equal(pictures[1], pictures[0]) and pictures[0].std() > 0


@pytest.mark.integration
def test_validation_samples_with_an_fp8_dit(z_image_repo, z_image_dataset, tmp_path):
    """`--fp8_models dit` is VRAM-managed by the trainer too: the stages activate it rather than move it."""
    cfg = tiny_config(
        z_image_repo, "z_image", z_image_dataset, tmp_path, fp8_models=["dit"], validation_prompts=["a red circle"],
        validation_height=32, validation_width=32, validation_num_inference_steps=2,
    )  # fmt: skip
    _, run = first_losses(cfg, steps=1)
    (path,) = trainer.validate(run, trainer.TrainState(step=1))
    assert path.is_file()


@pytest.mark.integration
def test_encoding_with_streamed_encoders_writes_the_same_cache(z_image_repo, z_image_dataset, tmp_path, monkeypatch):
    """`--stage encode --offload_models text_encoder,vae`: the encoders stay in CPU memory and stream; the cache
    holds exactly what resident encoders write."""
    from safetensors.torch import load_file

    built, build_task = [], trainer.build_task
    monkeypatch.setattr(trainer, "build_task", lambda *a, **k: built.append(build_task(*a, **k)) or built[-1])
    caches = []
    for name, offload_models in (("plain", []), ("off", ["text_encoder", "vae"])):
        cfg = tiny_config(
            z_image_repo, "z_image", z_image_dataset, tmp_path / name, stage="encode",
            cache_dir=str(tmp_path / f"cache-{name}"), offload_models=offload_models,
        )  # fmt: skip
        folder = trainer.encode_dataset(cfg)
        caches.append({str(p.relative_to(folder)): load_file(str(p)) for p in sorted(folder.rglob("*.safetensors"))})
    for slot in ("text_encoder", "vae"):
        assert vram_handle(built[0].models[slot]) is None
        handle = vram_handle(built[1].models[slot])
        assert handle is not None and handle.plan.streamed and not handle.plan.resident, slot
    assert caches[0].keys() == caches[1].keys() and len(caches[0]) == 4
    for file, tensors in caches[0].items():
        assert tensors.keys() == caches[1][file].keys()
        for key, value in tensors.items():
            assert torch.equal(caches[1][file][key], value), (file, key)

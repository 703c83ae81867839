"""`--task trajectory_imitation` with the toy family: the teacher's grid holds the student's sigmas, the loss is the
student's velocity against each big step of the teacher's CFG trajectory written out by hand, the teacher never
changes (the base with the LoRA off, or a frozen copy of a `--lora_checkpoint` start), and bad settings are named."""

import pytest
import torch
from diffsynth_training_toy import TASK, build

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.lora import load_lora
from diffsynth.training import trajectory
from diffsynth.training.config import TrainConfig
from diffsynth.training.data import batch_plan
from diffsynth.training.trainer import TrainState, micro_batch_noise, prepare_batch, save, setup, train_step


def toy_config(tmp_path, dataset, name="out", **overrides) -> TrainConfig:
    values = dict(
        family=TASK, dataset_base_path=str(dataset), output_path=str(tmp_path / name), max_pixels=64 * 64,
        bucket_step=16, batch_size=2, mixed_precision="no", dtype="float32", lora_rank=4, learning_rate=1e-2,
        max_steps=4, num_epochs=50, log_every=1, task="trajectory_imitation", trajectory_student_steps=3,
        trajectory_teacher_steps=12, trajectory_teacher_cfg_scale=2.5, trajectory_negative_prompt="blurry", seed=3,
    )  # fmt: skip
    values.update(overrides)
    if values["task"] != "trajectory_imitation":  # a run of another task refuses the --trajectory_* settings
        values = {k: v for k, v in values.items() if not k.startswith("trajectory_")}
    return TrainConfig(**values)


def perturb_lora(run, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in run.trainable.values():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def test_the_teacher_grid_holds_the_student_sigmas(tmp_path, dataset):
    run = setup(toy_config(tmp_path, dataset))
    student, teacher = trajectory.grids(run.task, (2, 4, 8, 8), 3, 12)
    assert len(student) == 4 and len(teacher) == 13 and student[-1] == teacher[-1] == 0
    assert all(any(float(t) == float(s) for t in teacher) for s in student)
    assert bool((teacher[1:] < teacher[:-1]).all())
    with pytest.raises(ConfigError, match="--trajectory_teacher_steps 2 is too coarse"):
        trajectory.grids(run.task, (2, 4, 8, 8), 3, 2)


def test_the_loss_is_the_student_against_the_teachers_big_steps_written_out(tmp_path, dataset):
    run = setup(toy_config(tmp_path, dataset))
    perturb_lora(run)
    items = [run.dataset[i] for i in batch_plan(run.dataset.batch_keys, batch_size=2)[0]]
    batch = prepare_batch(run, items)
    got = trajectory.trajectory_loss(run, run.model, items, batch, micro_batch_noise(3, 0, 0))

    base, encoder = build("denoiser"), build("text_encoder")  # the teacher: the toy as loaded (LoRA off)
    text, negative = list(batch["text"]), encoder.encode(["blurry", "blurry"])
    noise = torch.randn(batch["latents"].shape, generator=micro_batch_noise(3, 0, 0))
    student, teacher = trajectory.grids(run.task, batch["latents"].shape, 3, 12)
    x, path = noise, {float(teacher[0]): noise}
    with torch.no_grad():
        for i in range(12):
            sigma = teacher[i].expand(2)
            cond, uncond = base(x, sigma, text), base(x, sigma, negative)
            x = x + (teacher[i + 1] - teacher[i]) * (uncond + 2.5 * (cond - uncond))
            path[float(teacher[i + 1])] = x
    expected = 0.0
    for i in range(3):
        start, end = path[float(student[i])], path[float(student[i + 1])]
        target = (end - start) / (student[i + 1] - student[i])
        predicted = run.model(start, student[i].expand(2), batch["text"])
        weight = run.task.scheduler.training_weight(student[i].expand(2))
        expected = expected + ((predicted - target).pow(2).flatten(1).mean(1) * weight).mean()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    got.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in run.trainable.values())


def test_the_teacher_never_changes_and_a_lora_checkpoint_start_is_its_teacher(tmp_path, dataset):
    run = setup(toy_config(tmp_path, dataset, task="sft"))  # a LoRA to start from
    state = TrainState()
    for batch in batch_plan(run.dataset.batch_keys, batch_size=2)[:2]:
        state = train_step(run, state, [[run.dataset[i] for i in batch]])
    save(run, state)
    lora = run.output / "step-000002.safetensors"

    distil = setup(toy_config(tmp_path, dataset, "distil", lora_checkpoint=str(lora)))
    assert distil.teacher is not None and not any(p.requires_grad for p in distil.teacher.parameters())
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma, text = torch.tensor([0.4, 0.9]), [torch.randn(3, 8)] * 2
    reference = build("denoiser")
    load_lora(reference, lora)
    with torch.no_grad():
        torch.testing.assert_close(distil.teacher(x, sigma, text), reference(x, sigma, text), rtol=1e-5, atol=1e-6)
        before = {k: v.clone() for k, v in distil.teacher.state_dict().items()}
    state = TrainState()
    student_before = {k: p.detach().clone() for k, p in distil.trainable.items()}
    for batch in batch_plan(distil.dataset.batch_keys, batch_size=2)[:2]:
        state = train_step(distil, state, [[distil.dataset[i] for i in batch]])
    assert all(torch.equal(v, distil.teacher.state_dict()[k]) for k, v in before.items())
    assert any(not torch.equal(p, student_before[k]) for k, p in distil.trainable.items())

    plain = setup(toy_config(tmp_path, dataset, "plain"))
    assert plain.teacher is None  # a LoRA from zero: the teacher is its base, the LoRA switched off


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"cache_dir": "cache"}, "--task trajectory_imitation encodes the negative prompt"),
        ({"trajectory_student_steps": 12}, "--trajectory_student_steps 12 must be >= 1 and fewer than"),
    ],
)
def test_settings_errors_name_the_flag(tmp_path, dataset, overrides, message):
    with pytest.raises(ConfigError, match=message):
        toy_config(tmp_path, dataset, **overrides).check()

"""`--task dmd2` (distribution matching distillation) with the toy family: the teacher's CFG, the student's sample
and the DMD gradient written out by hand; the fake score's step is a plain flow-matching step on the student's
detached samples; who changes on which step; resume is bit-identical, fake score included; refused settings are
named."""

import copy

import pytest
import torch
import torch.nn.functional as F
from diffsynth_training_toy import TASK, build

from diffsynth.runtime.errors import ConfigError
from diffsynth.training import dmd2, trainer
from diffsynth.training.config import TrainConfig, parse_args
from diffsynth.training.data import batch_plan
from diffsynth.training.trainer import (
    TrainState,
    flow_matching_loss,
    micro_batch_noise,
    prepare_batch,
    setup,
    train,
    train_step,
)


def dmd2_config(tmp_path, dataset, name="out", **overrides) -> TrainConfig:
    values = dict(
        family=TASK, dataset_base_path=str(dataset), output_path=str(tmp_path / name), max_pixels=64 * 64,
        bucket_step=16, batch_size=2, mixed_precision="no", dtype="float32", lora_rank=4, learning_rate=1e-2,
        max_steps=4, num_epochs=50, log_every=1, task="dmd2", dmd2_student_update_freq=2, seed=3,
    )  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


def two_rows(run):
    items = [run.dataset[i] for i in range(2)]  # the two first 64x64 images
    return items, prepare_batch(run, items)


def perturb_lora(run, seed=0):
    """LoRA B starts at zero (the student equals its base); random factors make them differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in run.trainable.values():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def expand(v, like):
    return v.view(-1, *([1] * (like.ndim - 1)))


def test_the_teacher_is_the_base_with_cfg_against_the_negative_prompt(tmp_path, dataset):
    run = setup(dmd2_config(tmp_path, dataset, dmd2_teacher_cfg_scale=3.0, dmd2_negative_prompt="blurry"))
    perturb_lora(run)
    items, batch = two_rows(run)
    negative = dmd2.negative_batch(run, items)
    x = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.3, 0.8])
    module = run.accelerator.unwrap_model(run.model)
    student_before = module(x, sigma, batch["text"])
    got = dmd2.teacher_velocity(run, module, batch, negative, x, sigma)

    base, encoder = build("denoiser"), build("text_encoder")  # the toy's weights as loaded
    cond = base(x, sigma, encoder.encode(["a red circle", "a blue square"]))
    uncond = base(x, sigma, encoder.encode(["blurry", "blurry"]))
    torch.testing.assert_close(got, uncond + 3.0 * (cond - uncond), rtol=0, atol=1e-6)
    torch.testing.assert_close(negative["latents"], batch["latents"], rtol=0, atol=0)  # only the prompt differs
    assert (student_before - cond).abs().max() > 1e-2  # the LoRA was really switched off for the teacher...
    torch.testing.assert_close(module(x, sigma, batch["text"]), student_before, rtol=0, atol=0)  # ...and back on

    run.config.dmd2_teacher_cfg_scale = 1.0  # no CFG: no negative branch at all
    assert dmd2.negative_batch(run, items) is None
    torch.testing.assert_close(dmd2.teacher_velocity(run, module, batch, None, x, sigma), cond, rtol=0, atol=1e-6)


def test_the_dmd_gradient_is_the_normalised_fake_minus_teacher_direction():
    g = torch.Generator().manual_seed(0)
    generated = torch.randn(2, 4, 8, 8, generator=g).requires_grad_(True)
    fake, teacher = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    loss = dmd2.dmd_loss(generated, fake, teacher)
    loss.backward()
    norm = (generated.detach() - teacher).abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-6
    direction = (fake - teacher) / norm
    torch.testing.assert_close(generated.grad, direction / generated.numel(), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(loss, 0.5 * direction.pow(2).mean())


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_the_student_step_written_out(tmp_path, dataset, scale):
    """The student's sample (sde: the data noised to a random one of its uniform sigmas; noise alone at the
    first), the re-noising at a matching sigma, and the gradient that reaches the LoRA: that of
    `sum(g * d) / N` with d the normalised (fake x0 - teacher CFG x0), all from the batch's generator."""
    cfg = dmd2_config(tmp_path, dataset, dmd2_teacher_cfg_scale=scale, dmd2_student_sample_steps=3,
                      dmd2_matching_t_min=0.2, dmd2_matching_t_max=0.9)  # fmt: skip
    run = setup(cfg)
    perturb_lora(run)
    with torch.no_grad():  # a fake score that differs from the teacher
        for p in run.dmd2.fake_score.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    items, batch = two_rows(run)
    negative = dmd2.negative_batch(run, items)
    module = run.accelerator.unwrap_model(run.model)
    dmd_loss, fake_loss, judged = dmd2.micro_batch_losses(
        run, module, batch, negative, torch.Generator().manual_seed(5), update_student=True
    )
    assert judged is None and run.dmd2.discriminator is None  # no GAN term by default
    dmd_loss.backward()
    got = {name: p.grad.clone() for name, p in run.trainable.items()}
    module.zero_grad()

    rng = torch.Generator().manual_seed(5)
    x0, text, base = batch["latents"], batch["text"], build("denoiser")
    sigmas = torch.linspace(0.9, 0.0, 4)  # uniform: from min(t_max, 0.999) to 0
    k = torch.randint(0, 3, (2,), generator=rng)
    eps = torch.randn(x0.shape, generator=rng)
    s = sigmas[k]
    x = torch.stack([s[i] * eps[i] if k[i] == 0 else (1 - s[i]) * x0[i] + s[i] * eps[i] for i in range(2)])
    generated = x - expand(s, x) * module(x, s, text)
    t = torch.rand(2, generator=rng) * 0.7 + 0.2
    x_t = (1 - expand(t, x)) * generated.detach() + expand(t, x) * torch.randn(x0.shape, generator=rng)
    with torch.no_grad():
        fake_x0 = x_t - expand(t, x) * run.dmd2.fake_score(x_t, t, text)
        v = base(x_t, t, text)
        if scale != 1:
            v_neg = base(x_t, t, negative["text"])
            v = v_neg + scale * (v - v_neg)
        teacher_x0 = x_t - expand(t, x) * v
        direction = (fake_x0 - teacher_x0) / ((generated - teacher_x0).abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-6)
    (generated * direction).sum().div(generated.numel()).backward()
    for name, p in run.trainable.items():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(dmd_loss, 0.5 * direction.pow(2).mean(), rtol=1e-5, atol=0)
    assert k.tolist() == [2, 0]  # seed 5: both kinds of input, the data noised and noise alone
    want_fake = flow_matching_loss(run, run.dmd2.fake_score, {**batch, "latents": generated.detach()}, rng)
    torch.testing.assert_close(fake_loss, want_fake, rtol=1e-5, atol=0)


def test_ode_inputs_are_the_students_own_euler_steps(tmp_path, dataset):
    run = setup(dmd2_config(tmp_path, dataset, dmd2_student_sample_type="ode", dmd2_student_sample_steps=3,
                            dmd2_student_t_list=["1.0", "0.6", "0.3", "0"]))  # fmt: skip
    perturb_lora(run)
    _, batch = two_rows(run)
    module = run.accelerator.unwrap_model(run.model)
    seed = next(
        s for s in range(100) if torch.randint(0, 3, (2,), generator=torch.Generator().manual_seed(s)).min() > 0
    )
    with torch.no_grad():
        got, sigma = dmd2.student_sample(run, module, batch, torch.Generator().manual_seed(seed), grad=False)
        rng = torch.Generator().manual_seed(seed)
        k = torch.randint(0, 3, (2,), generator=rng)
        eps = torch.randn(batch["latents"].shape, generator=rng)
        sigmas = torch.tensor([1.0, 0.6, 0.3, 0.0])
        want = []
        for i in range(2):
            x, text = eps[i : i + 1], batch["text"][i : i + 1]
            for j in range(int(k[i])):
                x = x + (sigmas[j + 1] - sigmas[j]) * module(x, sigmas[j : j + 1], text)
            want.append(x - sigmas[k[i]] * module(x, sigmas[k[i]].view(1), text))
    torch.testing.assert_close(sigma, sigmas[k])
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-5, atol=1e-6)


def test_the_fake_score_step_is_a_flow_matching_step_on_the_detached_samples(tmp_path, dataset):
    run = setup(dmd2_config(tmp_path, dataset, dmd2_fake_score_learning_rate=3e-3, max_grad_norm=0.5))
    perturb_lora(run)
    items, batch = two_rows(run)
    module = run.accelerator.unwrap_model(run.model)
    student = {n: p.detach().clone() for n, p in run.trainable.items()}
    reference = copy.deepcopy(run.dmd2.fake_score)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=3e-3, weight_decay=run.config.weight_decay)
    rng = micro_batch_noise(run.config.seed, 0, 0)
    samples, _ = dmd2.student_sample(run, module, batch, rng, grad=False)
    flow_matching_loss(run, reference, {**batch, "latents": samples}, rng).backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    optimizer.step()

    state = train_step(run, TrainState(step=1), [items])  # step 1 of --dmd2_student_update_freq 2: no student
    for (name, got), want in zip(run.dmd2.fake_score.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7, msg=name)
    for name, p in run.trainable.items():
        assert torch.equal(p, student[name]), name
    assert state.step == 2 and "dmd_loss" not in run.dmd2.metrics


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_the_student_updates_every_n_steps_the_fake_score_every_step_the_teacher_never(tmp_path, dataset, full):
    overrides = {"trainable_models": ["denoiser"], "learning_rate": 1e-3} if full else {}
    # with CFG the teacher differs from the fake score from the start (both are copies of the base), so the
    # student's first update is not zero
    run = setup(dmd2_config(tmp_path, dataset, dmd2_student_update_freq=3, dmd2_teacher_cfg_scale=2.0, **overrides))
    module = run.accelerator.unwrap_model(run.model)
    teacher = run.dmd2.teacher if full else module
    assert (run.dmd2.teacher is not None) == full  # a LoRA's teacher is its own base

    def frozen(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}

    loaded = frozen(build("denoiser"))
    state = TrainState()
    for step in range(6):
        student = {n: p.detach().clone() for n, p in run.trainable.items()}
        fake = [p.detach().clone() for p in run.dmd2.fake_score.parameters()]
        (group,) = batch_plan(run.dataset.batch_keys[:1], batch_size=2)
        state = train_step(run, state, [[run.dataset[i] for i in group]])
        changed = [not torch.equal(p, student[n]) for n, p in run.trainable.items()]
        assert all(changed) if step % 3 == 0 else not any(changed), (step, changed)
        assert all(not torch.equal(a, b) for a, b in zip(fake, run.dmd2.fake_score.parameters(), strict=True)), step
        teacher_now = frozen(teacher)
        teacher_now = {n.replace(".base_layer", ""): p for n, p in teacher_now.items()}
        assert teacher_now.keys() == loaded.keys()
        for name, p in teacher_now.items():
            assert torch.equal(p, loaded[name]), (step, name)
    assert state.step == 6


def test_the_ema_moves_only_on_the_students_steps(tmp_path, dataset):
    run = setup(dmd2_config(tmp_path, dataset, dmd2_student_update_freq=3, ema_decay=0.9))
    state = TrainState()
    (group,) = batch_plan(run.dataset.batch_keys[:1], batch_size=2)
    for step in range(7):
        shadow = {n: v.clone() for n, v in run.ema.shadow.items()}
        state = train_step(run, state, [[run.dataset[i] for i in group]])
        assert run.ema.updates == step // 3 + 1, step
        if step % 3:  # no student step: the average stays as it was
            assert all(torch.equal(v, shadow[n]) for n, v in run.ema.shadow.items()), step
    assert run.ema.updates == 3  # steps 1, 4 and 7 updated the student


def test_a_step_logs_the_rate_it_used(tmp_path, dataset):
    run = setup(dmd2_config(tmp_path, dataset, lr_warmup_steps=3))
    (group,) = batch_plan(run.dataset.batch_keys[:1], batch_size=2)
    state = TrainState()
    for _ in range(2):
        state = train_step(run, state, [[run.dataset[i] for i in group]])
    assert state.lr == pytest.approx(1e-2 * 2 / 4)  # the warm-up's second factor, not the third that comes next


def test_resume_continues_bit_identically_fake_score_included(tmp_path, dataset, monkeypatch):
    from safetensors.torch import load_file

    settings = dict(max_steps=5, save_steps=2, dmd2_teacher_cfg_scale=2.0, lr_scheduler="cosine", lr_warmup_steps=1)
    train(dmd2_config(tmp_path, dataset, "straight", **settings))
    real_step = trainer.train_step

    def crash_after_two(run, state, group):
        if state.step == 2:
            raise KeyboardInterrupt
        return real_step(run, state, group)

    monkeypatch.setattr(trainer, "train_step", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        train(dmd2_config(tmp_path, dataset, "resumed", **settings))
    monkeypatch.setattr(trainer, "train_step", real_step)
    state = train(dmd2_config(tmp_path, dataset, "resumed", resume="latest", **settings))
    assert state.step == 5

    def outputs(name):
        folder = tmp_path / name / "checkpoints" / "step-000005"
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        optimizer = torch.load(folder / "dmd2-fake_score-optimizer.pt", weights_only=True)
        return (
            lines,
            load_file(str(folder / "trainable.safetensors")),
            load_file(str(folder / "dmd2-fake_score.safetensors")),
            optimizer,
        )

    import json

    straight, resumed = outputs("straight"), outputs("resumed")
    keep = ("step", "loss", "dmd_loss", "fake_score_loss", "lr")
    rows = [
        [{k: v for k, v in json.loads(line).items() if k in keep} for line in run[0]] for run in (straight, resumed)
    ]
    assert rows[0] == rows[1] and len(rows[0]) == 5, rows  # the resumed run logged 2 steps, then 3 more
    assert any("dmd_loss" in r for r in rows[0]) and all("fake_score_loss" in r for r in rows[0])
    for a, b in ((straight[1], resumed[1]), (straight[2], resumed[2])):
        assert a.keys() == b.keys() and len(a) > 0
        for name in a:
            assert torch.equal(a[name], b[name]), name
    for index, values in straight[3]["state"].items():
        for key, value in values.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(resumed[3]["state"][index][key])), (index, key)


def test_a_lora_checkpoint_start_is_the_teacher_and_the_fake_scores_start(tmp_path, dataset):
    """Started from --lora_checkpoint, the teacher (a frozen copy) and the fake score are the denoiser with the
    file's LoRA (the model the student starts as), not the base with the LoRA off; and the run resumes."""
    from diffsynth.runtime.lora import load_lora

    train(
        dmd2_config(tmp_path, dataset, "sft", task="sft", max_steps=2, learning_rate=5e-2, dmd2_student_update_freq=5)
    )
    lora = tmp_path / "sft" / "step-000002.safetensors"
    run = setup(dmd2_config(tmp_path, dataset, lora_checkpoint=str(lora)))
    assert run.dmd2.teacher is not None and not any(p.requires_grad for p in run.dmd2.teacher.parameters())
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma, text = torch.tensor([0.4, 0.9]), [torch.randn(3, 8)] * 2
    reference, base = build("denoiser"), build("denoiser")
    load_lora(reference, lora)
    with torch.no_grad():
        assert not torch.allclose(reference(x, sigma, text), base(x, sigma, text), atol=1e-3)  # the LoRA matters
        for model in (run.dmd2.teacher, run.dmd2.fake_score):
            torch.testing.assert_close(model(x, sigma, text), reference(x, sigma, text), rtol=1e-5, atol=1e-5)
    settings = dict(lora_checkpoint=str(lora), max_steps=3, save_steps=2)
    train(dmd2_config(tmp_path, dataset, "dmd2", **settings))
    assert train(dmd2_config(tmp_path, dataset, "dmd2", resume="latest", **{**settings, "max_steps": 4})).step == 4


def test_a_checkpoint_of_another_task_is_refused(tmp_path, dataset):
    train(dmd2_config(tmp_path, dataset, task="sft", max_steps=1, dmd2_student_update_freq=5))  # sft's default
    with pytest.raises(ConfigError, match="no dmd2-fake_score.safetensors .* which --task dmd2"):
        train(dmd2_config(tmp_path, dataset, max_steps=2, resume="latest"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"cache_dir": "cache"}, "--task dmd2 .* train without --cache_dir"),
        ({"mixed_precision": "fp16"}, "--task dmd2 with --mixed_precision fp16"),
        ({"dmd2_student_update_freq": 0}, "--dmd2_student_update_freq 0 must be >= 1"),
        ({"dmd2_student_sample_steps": 0}, "--dmd2_student_sample_steps 0 must be >= 1"),
        ({"dmd2_matching_t_min": 0.9, "dmd2_matching_t_max": 0.5}, "--dmd2_matching_t_min 0.9 and --dmd2_matching"),
        ({"dmd2_matching_t_std": 0.0}, "--dmd2_matching_t_std 0.0 must be > 0"),
        ({"dmd2_teacher_cfg_scale": 0.0}, "--dmd2_teacher_cfg_scale 0.0 must be > 0"),
        ({"dmd2_fake_score_learning_rate": -1.0}, "--dmd2_fake_score_learning_rate -1.0 must be > 0"),
        ({"dmd2_student_grad_clip_norm": -1.0}, "--dmd2_student_grad_clip_norm -1.0 must be >= 0"),
        ({"dmd2_student_t_list": ["0.9", "0.5", "0"]}, "has 3 sigmas; --dmd2_student_sample_steps 4 takes 5"),
        ({"dmd2_student_t_list": ["0.9", "0.6", "0.7", "0.2", "0"]}, "give decreasing sigmas in \\[0, 1\\]"),
        ({"dmd2_student_t_list": ["1", "0.6", "0.4", "0.2", "0.1"]}, "ending with 0"),
        ({"dmd2_student_t_list": ["1", "x", "0.4", "0.2", "0"]}, "give numbers separated by commas"),
    ],
)
def test_bad_settings_name_the_flag(tmp_path, dataset, overrides, message):
    with pytest.raises(ConfigError, match=message):
        dmd2_config(tmp_path, dataset, **overrides).check()


def test_the_pipeline_schedule_is_the_familys_and_needs_it(tmp_path, dataset, monkeypatch):
    import diffsynth_training_toy

    run = setup(dmd2_config(tmp_path, dataset, dmd2_student_schedule="pipeline", dmd2_student_sample_steps=3))
    want = run.task.inference_sigmas((2, 4, 8, 8), 3)
    torch.testing.assert_close(dmd2.student_sigmas(run.config, run.task, (2, 4, 8, 8)), want.float())
    uniform = dmd2.student_sigmas(dmd2_config(tmp_path, dataset, dmd2_student_sample_steps=3), run.task, (2, 4, 8, 8))
    torch.testing.assert_close(uniform, torch.tensor([0.999, 0.666, 0.333, 0.0]))
    monkeypatch.delattr(diffsynth_training_toy.ToyTask, "inference_sigmas")
    with pytest.raises(ConfigError, match="--dmd2_student_schedule pipeline: the toy training task has no inference"):
        setup(dmd2_config(tmp_path, dataset, dmd2_student_schedule="pipeline"))
    setup(dmd2_config(tmp_path, dataset))  # the uniform schedule does not need it


def test_the_cli_takes_diffsynth_studios_flags(tmp_path, dataset):
    cfg, _ = parse_args([
        "--family", TASK, "--dataset_base_path", str(dataset), "--task", "dmd2", "--dmd2_student_sample_steps", "4",
        "--dmd2_student_sample_type", "sde", "--dmd2_student_update_freq", "5", "--dmd2_teacher_cfg_scale", "4",
        "--dmd2_fake_score_learning_rate", "1e-5", "--dmd2_student_t_list", "0.999,0.75,0.5,0.25,0",
        "--dmd2_matching_t_sampling", "logitnormal", "--dmd2_student_grad_clip_norm", "0",
    ])  # fmt: skip
    assert (cfg.task, cfg.dmd2_student_update_freq, cfg.dmd2_teacher_cfg_scale) == ("dmd2", 5, 4.0)
    assert cfg.dmd2_student_t_list == ["0.999", "0.75", "0.5", "0.25", "0"]
    assert (cfg.dmd2_fake_score_learning_rate, cfg.dmd2_student_grad_clip_norm) == (1e-5, 0.0)


@pytest.mark.integration
def test_flux2_klein_teacher_is_the_pipelines_cfg_and_a_run_saves_the_fake_score(tmp_path):
    """A real family: on the tiny FLUX.2 klein repo the teacher (the base DiT, LoRA off) with CFG 4 against ""
    equals `Flux2ImagePipeline.predict` with cfg_scale 4; the pipeline schedule is the family's; the hidden
    features hook gives the image tokens (the last block's, through the final layer, are the velocity); two
    steps with the GAN term train and checkpoint the fake score under the DiT's own keys and the discriminator."""
    pytest.importorskip("diffsynth.flux")
    from dataclasses import replace
    from pathlib import Path

    from safetensors.torch import load_file

    from diffsynth.flux.flux2.pipeline import Flux2ImagePipeline
    from diffsynth.training.testing import load_module, tiny_config, write_caption_dataset

    repo_module = load_module(Path(__file__).parents[2] / "flux" / "tests" / "flux2_repo.py", "flux2_tiny_repo")
    torch.manual_seed(0)
    repo = repo_module.build_tiny_klein_repo(tmp_path / "repo")
    prompts = repo_module.CAPTIONS[:2]
    data = write_caption_dataset(tmp_path / "data", prompts, seed=1)
    cfg = tiny_config(repo, "flux2", data, tmp_path / "out", task="dmd2", task_options={"max_sequence_length": 64},
                      dmd2_teacher_cfg_scale=4.0, dmd2_student_schedule="pipeline", dmd2_student_sample_steps=2,
                      dmd2_student_update_freq=1, num_epochs=10)  # fmt: skip
    run = setup(cfg)
    perturb_lora(run)
    items, batch = two_rows(run)
    module = run.accelerator.unwrap_model(run.model)
    x = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(2))
    pipe = Flux2ImagePipeline.from_pretrained(str(repo), torch_dtype="float32", device="cpu")
    with torch.no_grad():
        got = dmd2.teacher_velocity(run, module, batch, dmd2.negative_batch(run, items), x, torch.tensor([0.7, 0.7]))
        text, negative = pipe.encode_prompt([r["prompt"] for r in items], 64), pipe.encode_prompt(["", ""], 64)
        want = pipe.predict(x, 0.7, text, negative, 4.0, None)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    sigmas = dmd2.student_sigmas(run.config, run.task, batch["latents"].shape)
    torch.testing.assert_close(sigmas, run.task.inference_sigmas(tuple(batch["latents"].shape), 2).float())

    # the hidden features of the last block, through the DiT's final layer, are the velocity: the hook takes the
    # image tokens, in the latents' order
    dit = run.dmd2.fake_score
    last = len(dit.double_blocks) + len(dit.single_blocks) - 1
    sigma = torch.tensor([0.7, 0.4])
    with torch.no_grad():
        first, final = run.task.hidden_features(dit, batch, x, sigma, [0, last])
        b, c, h, w = final.shape
        vec = dit.conditioning_vector(sigma, None, b, x.device, final.dtype)
        tokens = dit.final_layer(final.flatten(2).transpose(1, 2), vec)
        velocity = run.task.velocity(dit, batch, x, sigma)
    torch.testing.assert_close(tokens.transpose(1, 2).reshape(b, -1, h, w), velocity, rtol=1e-5, atol=1e-5)
    assert first.shape == final.shape == (2, dit.config.hidden_size, h, w)
    with pytest.raises(ConfigError, match=f"--dmd2_feature_indices {last + 1}: this FLUX.2 DiT has {last + 1} blocks"):
        run.task.hidden_features(dit, batch, x, sigma, [last + 1])

    gan = replace(cfg, dmd2_gan_loss_weight=0.03, dmd2_feature_indices=["1"], dmd2_gan_r1_reg_weight=0.1,
                  use_gradient_checkpointing=True)  # fmt: skip
    state = train(gan)
    assert state.step == 2
    folder = tmp_path / "out" / "checkpoints" / "step-000002"
    fake = load_file(str(folder / "dmd2-fake_score.safetensors"))
    assert fake.keys() == pipe.dit.state_dict().keys()
    assert load_file(str(folder / "dmd2-discriminator.safetensors"))["heads.0.0.weight"].shape[1] == c


# ----------------------------------------------------------------------------------- the GAN term
def toy_hidden_features(self, denoiser, batch, noisy, sigma, indices):
    """The toy's hidden state after its one block, as [B, width, h, w] maps (index 0: what the hook of a real
    family gives, the image tokens after that block)."""
    assert list(indices) == [0]
    b, c, h, w = noisy.shape
    tokens = noisy.flatten(2).transpose(1, 2)
    cond = denoiser.time(sigma.view(b, 1)) + denoiser.text(torch.stack([t.mean(0) for t in batch["text"]]))
    hidden = F.silu(denoiser.proj_in(tokens) + cond[:, None])
    hidden = hidden + denoiser.blocks[0](hidden)
    return [hidden.transpose(1, 2).reshape(b, -1, h, w)]


@pytest.fixture
def toy_features(monkeypatch):
    import diffsynth_training_toy

    monkeypatch.setattr(diffsynth_training_toy.ToyTask, "hidden_features", toy_hidden_features, raising=False)


GAN = dict(dmd2_gan_loss_weight=0.5, dmd2_feature_indices=["0"], dmd2_gan_r1_reg_weight=0.3)


def test_the_gan_terms_written_out(tmp_path, dataset, toy_features):
    """The student's loss adds w * softplus(-D(F(x_t))) through the fake score's features of its own
    re-noised sample; the discriminator's loss is softplus(D(fake)) + softplus(-D(real)) on the fake score's
    features of the detached samples and the data noised alike, plus the approximate R1 penalty; neither
    reaches the fake score's weights."""
    run = setup(dmd2_config(tmp_path, dataset, dmd2_student_sample_steps=2, **GAN))
    perturb_lora(run)
    items, batch = two_rows(run)
    module = run.accelerator.unwrap_model(run.model)
    loss, fake_loss, judged = dmd2.micro_batch_losses(
        run, module, batch, None, torch.Generator().manual_seed(5), update_student=True
    )
    (loss + judged).backward()
    assert all(p.grad is None for p in run.dmd2.fake_score.parameters())
    got = {n: p.grad.clone() for n, p in run.trainable.items()}
    judge = run.dmd2.discriminator
    got_judge = [p.grad.clone() for p in judge.parameters()]
    module.zero_grad()
    judge.zero_grad()

    rng = torch.Generator().manual_seed(5)
    fake_model, x0 = run.dmd2.fake_score, batch["latents"]
    generated, _ = dmd2.student_sample(run, module, batch, rng, grad=True)
    t = dmd2.matching_sigma(run.config, 2, rng)
    eps = torch.randn(x0.shape, generator=rng)
    x_t = (1 - expand(t, x0)) * generated + expand(t, x0) * eps
    with torch.no_grad():
        fake_x0 = x_t - expand(t, x0) * fake_model(x_t, t, batch["text"])
        teacher_x0 = x_t - expand(t, x0) * build("denoiser")(x_t, t, batch["text"])
    surrogate = dmd2.dmd_loss(generated, fake_x0, teacher_x0)
    gan = F.softplus(-judge(toy_hidden_features(None, fake_model, batch, x_t, t, [0]))).mean()
    want = surrogate + 0.5 * gan
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    grads = torch.autograd.grad(want, list(run.trainable.values()))
    for (name, g), w in zip(got.items(), grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-8, msg=name)

    flow_matching_loss(run, fake_model, {**batch, "latents": generated.detach()}, rng)  # its draws come first
    s = dmd2.matching_sigma(run.config, 2, rng)
    noise = torch.randn(x0.shape, generator=rng)
    real_in = (1 - expand(s, x0)) * x0 + expand(s, x0) * noise
    fake_in = (1 - expand(s, x0)) * generated.detach() + expand(s, x0) * noise
    with torch.no_grad():
        real_f = toy_hidden_features(None, fake_model, batch, real_in, s, [0])
        fake_f = toy_hidden_features(None, fake_model, batch, fake_in, s, [0])
        moved_f = toy_hidden_features(None, fake_model, batch, real_in + 0.1 * torch.randn(x0.shape, generator=rng),
                                      s, [0])  # fmt: skip
    real_logits = judge(real_f)
    want_judged = F.softplus(judge(fake_f)).mean() + F.softplus(-real_logits).mean()
    want_judged = want_judged + 0.3 * (real_logits - judge(moved_f)).pow(2).mean()
    torch.testing.assert_close(judged, want_judged, rtol=1e-5, atol=0)
    for g, w in zip(got_judge, torch.autograd.grad(want_judged, list(judge.parameters())), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-8)


def test_resume_with_the_gan_term_restores_the_discriminator(tmp_path, dataset, monkeypatch, toy_features):
    from safetensors.torch import load_file

    settings = dict(max_steps=4, save_steps=2, **GAN)
    train(dmd2_config(tmp_path, dataset, "straight", **settings))
    real_step = trainer.train_step

    def crash_after_two(run, state, group):
        if state.step == 2:
            raise KeyboardInterrupt
        return real_step(run, state, group)

    monkeypatch.setattr(trainer, "train_step", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        train(dmd2_config(tmp_path, dataset, "resumed", **settings))
    monkeypatch.setattr(trainer, "train_step", real_step)
    train(dmd2_config(tmp_path, dataset, "resumed", resume="latest", **settings))
    for name in ("trainable", "dmd2-fake_score", "dmd2-discriminator"):
        a, b = (load_file(str(tmp_path / r / "checkpoints" / "step-000004" / f"{name}.safetensors"))
                for r in ("straight", "resumed"))  # fmt: skip
        assert a.keys() == b.keys() and len(a) > 0
        assert all(torch.equal(a[k], b[k]) for k in a), name
    lines = [(tmp_path / r / "metrics.jsonl").read_text().splitlines() for r in ("straight", "resumed")]
    import json

    losses = [[json.loads(line).get("discriminator_loss") for line in run] for run in lines]
    assert losses[0] == losses[1] and None not in losses[0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dmd2_gan_loss_weight": 0.03}, "--dmd2_gan_loss_weight 0.03: .* give them \\(e.g. --dmd2_feature_indices 12"),
        ({"dmd2_feature_indices": ["3"]}, "--dmd2_feature_indices / --dmd2_gan_r1_reg_weight set the GAN term"),
        ({"dmd2_gan_loss_weight": 0.1, "dmd2_feature_indices": ["x"]}, "--dmd2_feature_indices 'x': give distinct"),
        ({"dmd2_gan_loss_weight": 0.1, "dmd2_feature_indices": ["2", "2"]}, "give distinct block indices"),
        ({"dmd2_gan_loss_weight": -1.0}, "--dmd2_gan_loss_weight -1.0 must be >= 0"),
        ({**GAN, "dmd2_gan_r1_reg_alpha": 0.0}, "--dmd2_gan_r1_reg_alpha 0.0 > 0"),
        ({**GAN, "dmd2_discriminator_learning_rate": 0.0}, "--dmd2_discriminator_learning_rate 0.0 must be > 0"),
    ],
)
def test_bad_gan_settings_name_the_flag(tmp_path, dataset, overrides, message):
    with pytest.raises(ConfigError, match=message):
        dmd2_config(tmp_path, dataset, **overrides).check()


def test_a_task_without_hidden_features_refuses_the_gan_term(tmp_path, dataset):
    with pytest.raises(ConfigError, match="the toy training task cannot give hidden features"):
        setup(dmd2_config(tmp_path, dataset, **GAN))


def test_the_readme_command_parses():
    """The README's DMD2 command (a `bash` block of its DMD2 section) is valid as users type it."""
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text[text.index("## DMD2 distillation") :]
    (block,) = re.findall(r"```bash\n(.*?)```", section[: section.index("\n## ")], flags=re.S)
    words = shlex.split(block.replace("\\\n", " "))
    cfg, _ = parse_args(words[words.index("diffsynth-train") + 1 :])
    assert (cfg.task, cfg.model, cfg.trainable_models) == ("dmd2", "black-forest-labs/FLUX.2-klein-base-4B", ["dit"])
    assert (cfg.dmd2_teacher_cfg_scale, cfg.dmd2_student_sample_steps, cfg.dmd2_student_update_freq) == (4.0, 4, 5)
    assert cfg.dmd2_student_schedule == "pipeline"  # the sigmas the README's 4-step sampling uses


_FEATURES_PRELUDE = """
import torch.nn.functional as F
def _features(self, denoiser, batch, noisy, sigma, indices):
    b, c, h, w = noisy.shape
    tokens = noisy.flatten(2).transpose(1, 2)
    cond = denoiser.time(sigma.view(b, 1)) + denoiser.text(torch.stack([t.mean(0) for t in batch["text"]]))
    hidden = F.silu(denoiser.proj_in(tokens) + cond[:, None])
    hidden = hidden + denoiser.blocks[0](hidden)
    return [hidden.transpose(1, 2).reshape(b, -1, h, w)]
module.ToyTask.hidden_features = _features
"""


def test_two_processes_equal_one_process_accumulating_two_micro_batches(tmp_path, dataset, toy_features):
    """DDP: the student's gradients averaged by its DDP wrapper, the fake score's and the discriminator's by
    `average_gradients`: the same weights as one process accumulating the same two micro-batches (GAN term on,
    a student step and non-student steps, `ode` inputs: the processes take different numbers of student calls)."""
    from diffsynth_training_toy import DISTRIBUTED_SETTINGS, run_two_processes, train_one_process
    from safetensors.torch import load_file

    settings = dict(task="dmd2", dmd2_student_update_freq=2, dmd2_teacher_cfg_scale=2.0, dmd2_gan_loss_weight=0.5,
                    dmd2_gan_r1_reg_weight=0.3, dmd2_student_sample_type="ode")  # fmt: skip
    train_one_process(tmp_path, dataset, accumulation=2, dmd2_feature_indices=["0"], **settings)
    ddp = {**DISTRIBUTED_SETTINGS, **settings, "dmd2_feature_indices": "0", "dataset_base_path": dataset,
           "output_path": tmp_path / "ddp"}  # fmt: skip
    run_two_processes(tmp_path, ddp, prelude=_FEATURES_PRELUDE)
    for name in ("trainable", "dmd2-fake_score", "dmd2-discriminator"):
        one, two = (load_file(str(tmp_path / run / "checkpoints" / "step-000003" / f"{name}.safetensors"))
                    for run in ("one", "ddp"))  # fmt: skip
        assert one.keys() == two.keys() and len(one) > 0
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
    one = load_file(str(tmp_path / "one" / "checkpoints" / "step-000003" / "trainable.safetensors"))
    assert max(v.abs().max().item() for k, v in one.items() if "lora_B" in k) > 1e-4  # the student trained

"""`--validation_prompts_file`: kohya's / musubi-tuner's sample-prompt lines (parsed by the runtime's
`prompt_lines`, tested there) checked before any model loads or at setup (naming file, line and option), and sampled
one call a line with the line's settings over the `--validation_*` ones (the toy task, made to record its calls)."""

import json

import pytest
from diffsynth_training_toy import TASK, ToyTask, build, write_images
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.training.config import TrainConfig, parse_args
from diffsynth.training.trainer import TrainState, prompts_file_samples, setup, train, validate


def toy_config(tmp_path, dataset, **overrides) -> TrainConfig:
    values = dict(
        family=TASK, dataset_base_path=str(dataset), output_path=str(tmp_path / "out"), max_pixels=64 * 128,
        bucket_step=16, batch_size=2, mixed_precision="no", dtype="float32", lora_rank=4, max_steps=2,
        num_epochs=10,
    )  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


def write_prompts(folder, *lines) -> str:
    path = folder / "prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        # the parser's messages are tested with it (runtime tests/test_prompt_lines.py): here, that the trainer
        # reads the file before any model loads and names it with its flag
        ("a cat --x 3", "^--validation_prompts_file .*prompts.txt line 2: unknown option --x"),
        ("a cat --i nowhere.png", "^--validation_prompts_file .*prompts.txt line 2: --i nowhere.png: no such file"),
    ],
)
def test_bad_lines_are_named_before_any_model_loads(tmp_path, dataset, line, message):
    """Read with the data paths (`check_data_paths`, before any model loads), not by `check`, which also reads
    configs written for another machine."""
    path = write_prompts(tmp_path, "a fine line", line)
    with pytest.raises(ConfigError, match=message):
        toy_config(tmp_path, dataset, validation_prompts_file=path).check().check_data_paths()


def test_an_empty_file_a_missing_file_and_the_cache_are_refused(tmp_path, dataset):
    with pytest.raises(ConfigError, match="no prompts"):
        toy_config(tmp_path, dataset, validation_prompts_file=write_prompts(tmp_path, "# nothing")).check_data_paths()
    with pytest.raises(ConfigError, match="cannot be read"):
        toy_config(tmp_path, dataset, validation_prompts_file=str(tmp_path / "none.txt")).check_data_paths()
    path = write_prompts(tmp_path, "a cat")
    with pytest.raises(ConfigError, match="--validation_prompts_file needs the text encoders"):
        toy_config(
            tmp_path, dataset, validation_prompts_file=path, cache_dir=str(tmp_path / "c"), stage="train"
        ).check()
    assert parse_args(["--family", TASK, "--dataset_base_path", str(dataset), "--validation_prompts_file", path])


@pytest.fixture
def recording(monkeypatch):
    """The toy task recording each `sample` call: its prompts, seed, references and settings."""
    calls = []
    toy_sample = ToyTask.sample

    def sample(self, denoiser, prompts, *, seed, references=None, **options):
        calls.append(dict(prompts=list(prompts), seed=seed, references=references, **options))
        return toy_sample(self, denoiser, prompts, seed=seed, **options)

    monkeypatch.setattr(ToyTask, "sample", sample)
    return calls


def test_each_line_is_sampled_with_its_settings_over_the_flags(tmp_path, dataset, recording):
    path = write_prompts(tmp_path, "[trigger] on a red sofa --d 7 --s 3 --n blurry", "a blue square --h 48")
    config = toy_config(
        tmp_path,
        dataset,
        validation_prompts=["a green triangle"],
        validation_prompts_file=path,
        validation_num_inference_steps=5,
        validation_width=40,
        validation_seed=11,
        trigger_word="sks cat",
    )
    run = setup(config)
    written = validate(run, TrainState(step=2))
    assert recording == [
        dict(prompts=["a green triangle"], seed=11, references=None, num_inference_steps=5, width=40),
        dict(prompts=["sks cat on a red sofa"], seed=7, references=None, num_inference_steps=3, width=40,
             negative_prompt="blurry"),
        dict(prompts=["a blue square"], seed=11, references=None, num_inference_steps=5, width=40, height=48),
    ]  # fmt: skip
    assert [p.name for p in written] == ["step-000002-0.png", "step-000002-1.png", "step-000002-2.png"]
    # each picture is the task's sample for its line's seed: the seed reached the sampler
    recording.clear()
    module = run.accelerator.unwrap_model(run.model).eval()
    expected = ToyTask.sample(run.task, module, ["sks cat on a red sofa"], seed=7)[0]
    assert list(Image.open(written[1]).getdata()) == list(expected.getdata())


def test_training_samples_the_file_at_the_validation_steps(tmp_path, dataset, recording):
    path = write_prompts(tmp_path, "a cat", "a dog --d 3")
    train(toy_config(tmp_path, dataset, max_steps=4, validation_steps=2, validation_prompts_file=path))
    assert [(c["prompts"], c["seed"]) for c in recording] == [(["a cat"], 0), (["a dog"], 3)] * 2
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 4
    assert sorted(p.name for p in (tmp_path / "out" / "validation").iterdir()) == [
        "step-000002-0.png", "step-000002-1.png", "step-000004-0.png", "step-000004-1.png"
    ]  # fmt: skip


class _Pipeline:
    def __call__(self, prompt, *, height=None, width=None, num_inference_steps=None, seed=0, cfg_scale=1.0):
        raise AssertionError("not called at setup")


class _Task:
    family = "stub"
    pipe = _Pipeline()

    def __init__(self, kind="optional", count=None):
        self.validation_references, self.count = kind, count

    def reference_arguments(self, images):
        if self.count is not None and len(images) != self.count:
            raise ConfigError(f"takes {self.count} pictures")
        return {}


def test_lines_are_checked_against_the_task_at_setup(tmp_path):
    write_images(tmp_path, [(8, 8), (8, 8)])

    def lines(*text, task=None):
        config = TrainConfig(
            family=TASK, dataset_base_path=str(tmp_path), validation_prompts_file=write_prompts(tmp_path, *text)
        )
        return prompts_file_samples(config, task or _Task())

    ((line, references),) = lines("a cat --l 3 --i img0.png --i img1.png")
    assert line.options == {"cfg_scale": 3.0} and [r.size for r in references] == [(8, 8), (8, 8)]
    assert lines("a cat")[0][1] is None
    with pytest.raises(ConfigError, match="line 2: the stub pipeline has no setting 'num_frames'"):
        lines("a cat", "a dog --f 9")
    with pytest.raises(ConfigError, match="line 1: --i: the stub training task samples without reference images"):
        lines("a cat --i img0.png", task=_Task("none"))
    with pytest.raises(ConfigError, match="line 1: the stub model samples from reference images; give --i"):
        lines("a cat", task=_Task("required"))
    with pytest.raises(ConfigError, match="line 1: --i: takes 2 pictures"):
        lines("a cat --i img0.png", task=_Task(count=2))


def test_sample_at_first_draws_the_base_models_pictures_before_training(tmp_path, dataset, recording):
    path = write_prompts(tmp_path, "a cat")
    train(toy_config(tmp_path, dataset, max_steps=2, validation_prompts_file=path, sample_at_first=True))
    assert [c["prompts"] for c in recording] == [["a cat"], ["a cat"]]  # before step 1, and at the end
    folder = tmp_path / "out" / "validation"
    assert sorted(p.name for p in folder.iterdir()) == ["step-000000-0.png", "step-000002-0.png"]
    base = ToyTask.sample(setup(toy_config(tmp_path, dataset)).task, build("denoiser").eval(), ["a cat"], seed=0)[0]
    assert list(Image.open(folder / "step-000000-0.png").getdata()) == list(base.getdata())  # the untrained model's
    with pytest.raises(ConfigError, match="--sample_at_first samples the validation prompts"):
        toy_config(tmp_path, dataset, sample_at_first=True).check()

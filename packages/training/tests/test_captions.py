"""kohya's tag-caption augmentations (`--shuffle_caption`, `--keep_tokens`, `--keep_tokens_separator`,
`--caption_tag_dropout`): the pure functions of captions.py, and the prompts the toy task receives in training."""

import csv
from collections import Counter

import pytest
import torch
from diffsynth_training_toy import TASK, write_images

from diffsynth.runtime.errors import ConfigError
from diffsynth.training.captions import augment_caption, augment_rows, tags
from diffsynth.training.config import TrainConfig
from diffsynth.training.data import batch_plan
from diffsynth.training.testing import first_losses
from diffsynth.training.trainer import TAGS_STREAM, micro_batch_generator

CAPTION = "1girl, red hair, smiling, outdoors, blue eyes, long hair, school uniform, cherry blossoms, sky, wind"


def draw(caption: str, seed: int = 0, **options) -> str:
    return augment_caption(caption, torch.Generator().manual_seed(seed), **options)


def test_tags_are_split_on_commas_stripped_and_never_empty():
    assert tags(" 1girl ,red hair,, smiling ,  ") == ["1girl", "red hair", "smiling"]
    assert draw(" 1girl ,red hair,, smiling ,  ") == "1girl, red hair, smiling"  # no flag: tidied, in order
    assert draw("") == "" and draw("", shuffle=True, dropout=0.5) == ""


def test_a_shuffled_caption_is_a_permutation_of_its_tags():
    shuffled = [draw(CAPTION, seed, shuffle=True) for seed in range(20)]
    for caption in shuffled:
        assert Counter(tags(caption)) == Counter(tags(CAPTION))
    assert len(set(shuffled)) > 10  # shuffled indeed: 10! orders, 20 draws


def test_keep_tokens_keeps_the_first_tags_in_front_in_order():
    original = tags(CAPTION)
    for seed in range(20):
        caption = tags(draw(CAPTION, seed, shuffle=True, keep_tokens=3))
        assert caption[:3] == original[:3]
        assert Counter(caption[3:]) == Counter(original[3:])
    assert len({draw(CAPTION, seed, shuffle=True, keep_tokens=3) for seed in range(20)}) > 10
    assert draw("a, b", 0, shuffle=True, keep_tokens=5) == "a, b"  # more than there are: all kept


def test_the_separator_keeps_what_is_before_it_and_is_removed():
    caption = "masterpiece, 1girl ||| red hair, smiling, outdoors, blue eyes, sky, wind"
    for seed in range(20):
        out = draw(caption, seed, shuffle=True, keep_tokens=4, separator="|||")  # the separator wins
        assert "|||" not in out
        assert tags(out)[:2] == ["masterpiece", "1girl"]
        assert Counter(tags(out)[2:]) == Counter(["red hair", "smiling", "outdoors", "blue eyes", "sky", "wind"])
    assert draw(caption, separator="|||") == "masterpiece, 1girl, red hair, smiling, outdoors, blue eyes, sky, wind"
    # a caption without it: --keep_tokens
    assert tags(draw(CAPTION, 3, shuffle=True, keep_tokens=2, separator="|||"))[:2] == ["1girl", "red hair"]


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_tag_dropout_drops_each_free_tag_with_chance_p(p):
    generator = torch.Generator().manual_seed(7)
    caption = ", ".join(f"tag{i}" for i in range(20))
    kept = dropped = 0
    for _ in range(100):  # 100 captions x 18 free tags = 1800 draws
        out = tags(augment_caption(caption, generator, shuffle=True, keep_tokens=2, dropout=p))
        assert out[:2] == ["tag0", "tag1"]  # the kept tags are never dropped
        assert len(set(out)) == len(out) and set(out) <= set(tags(caption))
        kept += len(out) - 2
        dropped += 18 - (len(out) - 2)
    assert dropped / (kept + dropped) == pytest.approx(p, abs=0.05)
    unshuffled = tags(draw(caption, 1, dropout=p))  # dropout alone keeps the order
    assert unshuffled == [t for t in tags(caption) if t in unshuffled] and len(unshuffled) < 20


@pytest.mark.parametrize(
    "caption",
    [
        "sks, 1girl, red hair, smiling, outdoors, sky",  # --trigger_word's own placement: first
        "1girl, red hair, sks, smiling, outdoors, sky",  # [trigger] in the middle of the tags
        "1girl ||| red hair, sks, smiling, outdoors, sky",  # after the separator
    ],
)
def test_the_trigger_word_stays_first_and_is_never_dropped(caption):
    for seed in range(50):
        out = tags(draw(caption, seed, shuffle=True, separator="|||", dropout=0.9, trigger="sks"))
        assert out[0] == "sks" and out.count("sks") == 1
    # without the trigger option the same draws move or drop it: the option is what keeps it
    plain = [tags(draw(caption, seed, shuffle=True, separator="|||", dropout=0.9)) for seed in range(50)]
    assert any(not out or out[0] != "sks" for out in plain)


def test_a_trigger_tag_among_the_kept_ones_stays_where_it_is():
    for seed in range(10):
        out = tags(draw("1girl, sks girl, red hair, smiling, sky", seed, shuffle=True, keep_tokens=2, trigger="sks"))
        assert out[:2] == ["1girl", "sks girl"]


def test_a_second_separator_keeps_the_ending_fixed():
    """kohya's `fixed ||| shuffled ||| fixed ending`: the ending stays last, in order, never dropped."""
    caption = "sks, 1girl ||| red hair, smiling, sky, wind ||| best quality, masterpiece"
    outs = [tags(draw(caption, seed, shuffle=True, separator="|||", dropout=0.5)) for seed in range(30)]
    for out in outs:
        assert out[:2] == ["sks", "1girl"] and out[-2:] == ["best quality", "masterpiece"]
        assert not any("|||" in t for t in out)
    assert len({tuple(out[2:-2]) for out in outs}) > 5  # the middle is drawn


def test_the_trigger_is_matched_as_whole_words_and_by_each_of_its_parts():
    for seed in range(20):  # "catwalk" holds "cat" only as letters: it is shuffled and dropped like any tag
        out = tags(draw("a dog, catwalk, cat, sky, wind", seed, shuffle=True, dropout=0.5, trigger="cat"))
        assert out[0] == "cat"
    assert any(
        "catwalk" not in tags(draw("a dog, catwalk, cat, sky", seed, dropout=0.6, trigger="cat")) for seed in range(20)
    )
    for seed in range(20):  # a trigger with a comma: each part is kept, in front
        out = tags(draw("sks, dog, sitting, red hair, grass", seed, shuffle=True, dropout=0.7, trigger="sks, dog"))
        assert out[:2] == ["sks", "dog"]


def config(**overrides) -> TrainConfig:
    return TrainConfig(**{"family": TASK, "dataset_base_path": "data", **overrides})


def test_the_micro_batch_keys_the_draws():
    cfg = config(shuffle_caption=True, caption_tag_dropout=0.2, seed=3)
    rows = [{"prompt": CAPTION}, {"prompt": CAPTION}, {"image": "x.png"}]

    def prompts(epoch, index, seed=3):
        return [
            r.get("prompt") for r in augment_rows(cfg, rows, micro_batch_generator(seed, epoch, index, TAGS_STREAM))
        ]

    assert prompts(1, 4) == prompts(1, 4)  # reruns, resumes and DDP draw alike
    assert prompts(1, 4) != prompts(1, 5) and prompts(1, 4) != prompts(2, 4)
    first, second, none = prompts(1, 4)
    assert first != second and none is None  # rows draw one after the other; a row without a prompt is left alone
    assert augment_rows(config(), rows, torch.Generator()) is rows  # no flag: untouched


def tag_dataset(folder):
    """Six pictures in two buckets, each captioned with its own eight tags."""
    names = write_images(folder, [(64, 64)] * 4 + [(128, 64)] * 2)
    with (folder / "metadata.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "prompt"])
        writer.writeheader()
        writer.writerows(
            {"image": n, "prompt": ", ".join(f"tag{i}_{j}" for j in range(8))} for i, n in enumerate(names)
        )
    return folder


def test_the_task_receives_the_prompts_as_the_function_draws_them(tmp_path, encoded_prompts):
    seen = encoded_prompts
    # --trigger_word puts "sks" first: --keep_tokens counts it, as the caption's first tag
    options = dict(shuffle_caption=True, keep_tokens=2, caption_tag_dropout=0.25, trigger_word="sks")
    cfg = TrainConfig(
        family=TASK, dataset_base_path=str(tag_dataset(tmp_path / "data")), output_path=str(tmp_path / "out"),
        max_pixels=64 * 128, bucket_step=16, batch_size=2, mixed_precision="no", dtype="float32", lora_rank=4,
        max_steps=3, num_epochs=10, seed=5, **options,
    )  # fmt: skip
    _, run = first_losses(cfg, steps=3)
    expected = []
    for index, batch in enumerate(batch_plan(run.dataset.batch_keys, batch_size=2)[:3]):
        rows = [run.dataset[i] for i in batch]
        assert all(row["prompt"].startswith("sks, tag") for row in rows)  # --trigger_word put it first
        generator = micro_batch_generator(cfg.seed, 0, index, TAGS_STREAM)
        expected.append([row["prompt"] for row in augment_rows(cfg, rows, generator)])
        assert expected[-1] != [row["prompt"] for row in rows]  # rewritten
    assert seen == expected
    for prompt in (p for batch in seen for p in batch):
        first, second, *rest = tags(prompt)
        assert first == "sks" and second.endswith("_0") and rest  # the kept tags, then the drawn ones


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"shuffle_caption": True, "cache_dir": "cache"}, "--shuffle_caption rewrites each caption .* --cache_dir"),
        ({"caption_tag_dropout": 0.1, "cache_dir": "cache"}, "--caption_tag_dropout rewrites each caption"),
        ({"keep_tokens_separator": "|||", "cache_dir": "cache"}, "--keep_tokens_separator rewrites each caption"),
        ({"shuffle_caption": True, "keep_tokens": -1}, "--keep_tokens -1 must be >= 0"),
        ({"caption_tag_dropout": 1.0}, r"--caption_tag_dropout 1.0 must be a probability in \[0, 1\)"),
        ({"caption_tag_dropout": -0.1}, r"--caption_tag_dropout -0.1 must be a probability"),
        ({"keep_tokens": 2}, "--keep_tokens 2 keeps tags out of --shuffle_caption and --caption_tag_dropout"),
        ({"shuffle_caption": True, "task": "dmd2"}, "--shuffle_caption: --task dmd2 encodes its rows' prompts"),
        ({"keep_tokens_separator": "|||", "task": "dmd2"}, "--keep_tokens_separator: --task dmd2 encodes"),
    ],
)
def test_bad_settings_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(**overrides).check()


@pytest.mark.parametrize("task", ["direct_distill", "trajectory_imitation", "dmd2"])
@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        ({"caption_dropout": 0.1}, "--caption_dropout 0.1"),
        ({"shuffle_caption": True}, "--shuffle_caption"),
        ({"caption_tag_dropout": 0.1}, "--caption_tag_dropout"),
    ],
)
def test_caption_augmentation_is_sfts_alone(task, overrides, flag):
    with pytest.raises(ConfigError, match=f"{flag}: --task {task} "):
        config(task=task, **overrides).check()


def test_good_settings_pass():
    config(shuffle_caption=True, keep_tokens=1, keep_tokens_separator="|||", caption_tag_dropout=0.1).check()
    config(keep_tokens_separator="|||", task="direct_distill").check()  # only strips itself from the captions
    config(cache_dir="cache").check()  # no caption flag: the cache is fine

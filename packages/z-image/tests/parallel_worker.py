"""One rank of test_parallel.py (run as a script by `run_ranks`): the tiny pipeline with its DiT calls
divided over the ranks gives what one process gives, which every rank also computes for itself."""

from __future__ import annotations

import sys

import torch

from diffsynth.runtime.testing.distributed import check_parallel_pipeline
from diffsynth.z_image import ZImagePipeline

PROMPTS = ["a red circle on a blue background", "a small green square in the top left corner"]
OPTIONS = {"num_inference_steps": 6, "cfg_scale": 3.0, "negative_prompt": "blurry", "output_type": "pt"}


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0, msg=lambda m: f"{what}: {m}")


def run(pipe, height: int, width: int) -> torch.Tensor:
    return pipe(PROMPTS, seed=0, height=height, width=width, progress_bar=False, **OPTIONS)


def main(repo: str, sequence: int, batch: int) -> None:
    pipe = ZImagePipeline.from_pretrained(repo, torch_dtype="float32", device="cpu")
    seen = []  # [batch, tokens] entering the main layers: what this rank really computed
    pipe.dit.layers[0].register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[:2])))

    def check_shards():
        # (a rank's half of a CFG batch may pad its captions less than the whole batch does)
        (rows, tokens), full, exact = seen[-1], seen[0], batch == 1
        assert rows == full[0] // batch and (tokens * sequence == full[1] if exact else tokens * sequence <= full[1])

    # a random tiny DiT changes a lot from step to step (relative first-block change 1.2 to 1.5 here):
    # this threshold reuses some steps and not others
    _, want = check_parallel_pipeline(pipe, lambda: run(pipe, 64, 48), 1.4, sequence, batch, close, check_shards)

    if batch == 1:  # DiffSynth-Studio's spelling: every rank divides the tokens
        usp = ZImagePipeline.from_pretrained(repo, torch_dtype="float32", device="cpu", use_usp=True)
        assert usp.dit.parallel.sequence_size == sequence
        close(run(usp, 64, 48), want, "use_usp=True")


def controls(repo: str, controlnet: str, sequence: int, batch: int) -> None:
    """The same with a Fun ControlNet (test_controlnet.py): its control stream is divided like the DiT's tokens."""
    import numpy as np
    from PIL import Image

    from diffsynth.z_image import ControlNetInput

    pipe = ZImagePipeline.from_pretrained(repo, torch_dtype="float32", device="cpu", controlnet=controlnet)
    rng = np.random.default_rng(0)
    image, kept = (Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)) for _ in range(2))
    mask = Image.fromarray(np.tile(np.arange(48, dtype=np.uint8) * 5, (64, 1)))  # 2-D uint8: mode "L"
    inputs = [ControlNetInput(image=image, inpaint_image=kept, inpaint_mask=mask, scale=0.8, end=0.7)]

    def run_controlled():
        return pipe(PROMPTS, seed=0, height=64, width=48, progress_bar=False, controlnet_inputs=inputs, **OPTIONS)

    check_parallel_pipeline(pipe, run_controlled, 1.4, sequence, batch, close)


def cli(repo: str, output: str) -> None:
    """`diffsynth generate --sequence-parallel 2` as torchrun would run it: rank 0 writes the image."""
    from diffsynth.runtime.cli import main as diffsynth
    from diffsynth.runtime.pipeline import BasePipeline

    layouts = []  # what the command asked the pipeline for
    enable = BasePipeline.enable_parallel

    def spy(pipe, sequence=None, batch=1):
        layouts.append((sequence, batch))
        return enable(pipe, sequence, batch)

    BasePipeline.enable_parallel = spy
    options = ["--height", "64", "--width", "48", "--steps", "2", "--device", "cpu", "--dtype", "float32"]
    code = diffsynth(
        ["generate", "--model", repo, "--prompt", PROMPTS[0], "--sequence-parallel", "2", "--output", output, *options]
    )
    assert code == 0 and layouts == [(2, 1)], layouts


if __name__ == "__main__":
    # REPO "SxB,..." [CLI_OUTPUT | --controlnet FILE]: several layouts (and the CLI) in one launch, one process
    # start-up for all; with --controlnet, the layouts run with that ControlNet instead
    layouts = [tuple(int(n) for n in layout.split("x")) for layout in sys.argv[2].split(",")]
    if len(sys.argv) > 4 and sys.argv[3] == "--controlnet":
        for sequence, batch in layouts:
            controls(sys.argv[1], sys.argv[4], sequence, batch)
    else:
        for sequence, batch in layouts:
            main(sys.argv[1], sequence, batch)
        if len(sys.argv) > 3:
            cli(sys.argv[1], sys.argv[3])

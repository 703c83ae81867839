"""Multi-process training (accelerate DDP, here two CPU processes over gloo) takes the same optimizer steps as
one process accumulating the same micro-batches: process r trains batch `k * world + r` of the epoch's plan
with that batch's own noise, and DDP averages the gradients the way accumulation does."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from diffsynth_training_toy import TASK
from safetensors.torch import load_file

from diffsynth.training.config import TrainConfig
from diffsynth.training.trainer import train

LAUNCHER = textwrap.dedent(
    """
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("diffsynth_training_toy", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    sys.modules["diffsynth_training_toy"] = module
    spec.loader.exec_module(module)
    import torch
    torch.set_num_threads(1)
    from diffsynth.training.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)
SETTINGS = dict(
    family=TASK,
    max_pixels=64 * 128,
    bucket_step=16,
    batch_size=1,
    mixed_precision="no",
    dtype="float32",
    lora_rank=4,
    learning_rate=1e-2,
    max_steps=3,
    num_epochs=1,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "checkpoints" / "step-000003" / "trainable.safetensors"))


def test_two_processes_equal_one_process_accumulating_two_micro_batches(tmp_path, dataset):
    train(TrainConfig(**SETTINGS, dataset_base_path=str(dataset), output_path=str(tmp_path / "one"),
                      gradient_accumulation_steps=2))  # fmt: skip

    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    flags = [f"--{k}={v}" for k, v in SETTINGS.items()]
    flags += [f"--dataset_base_path={dataset}", f"--output_path={tmp_path / 'ddp'}"]
    toy = Path(__file__).with_name("toy.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    done = subprocess.run(
        [*command, str(launcher), str(toy), *flags], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])

    one, ddp = final_weights(tmp_path / "one"), final_weights(tmp_path / "ddp")
    assert one.keys() == ddp.keys() and len(one) > 0
    assert max(v.abs().max().item() for k, v in one.items() if "lora_B" in k) > 1e-4  # B starts at zero: it trained
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-5, atol=1e-6, msg=key)

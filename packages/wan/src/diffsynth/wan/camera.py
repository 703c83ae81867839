"""Camera control for Alibaba PAI's Wan Fun Control-Camera DiTs (Wan2.1-Fun-V1.1-1.3B / 14B-Control-Camera,
Wan2.2-Fun-A14B-Control-Camera), as DiffSynth-Studio drives them (`camera_control_direction`, `..._speed`,
`..._origin`).

A camera path is a list of poses in the CameraCtrl format the models were trained with: per frame
`[time, fx, fy, cx, cy, 0, 0, w2c (3 x 4, row-major)]`, intrinsics normalised by the image size. A direction
changes one w2c entry by a fixed `speed` per frame, as DiffSynth-Studio does: "Left" / "Right" the (0, 2) entry
and "Up" / "Down" the (1, 2) entry (the view axis tilts sideways or up: a pan), "In" / "Out" the z translation;
combinations are allowed ("LeftUp"). Every frame's pose is taken relative to the first (which becomes the identity),
and each pixel's ray is turned into its Plücker coordinates `(origin x direction, direction)`: 6 channels per
pixel per frame. The DiT's `control_adapter` reads them four frames at a time, like the VAE's latent frames: the
first frame is repeated four times and each group of four frames is stacked on channels (24 channels).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from diffsynth.runtime.errors import ConfigError

DIRECTIONS = ("Left", "Right", "Up", "Down", "In", "Out")
DEFAULT_SPEED = 1 / 54
# DiffSynth-Studio's starting pose: focal lengths (0.532, 0.946) of a 1280 x 720 frame, centred, identity w2c
DEFAULT_ORIGIN = (0, 0.532139961, 0.946026558, 0.5, 0.5, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0)
POSE_SIZE = (1280, 720)  # (width, height) the poses' intrinsics were normalised by
# the pose entry each move changes and its sign: w2c (0, 2) = entry 9, (1, 2) = 13, z translation = 18
_MOVES = {"Left": (9, 1), "Right": (9, -1), "Up": (13, 1), "Down": (13, -1), "In": (18, -1), "Out": (18, 1)}


def check_direction(direction) -> tuple[str, ...]:
    """The moves a direction names ("Left", "RightUp", ...), refused by name when it names none or an unknown one."""
    if not isinstance(direction, str) or not direction:  # "" names no move: a static camera the DiTs never saw
        raise ConfigError(f"camera_control_direction={direction!r} is not accepted; give e.g. 'Left' or 'LeftUp'")
    rest, moves = direction, []
    while rest:
        move = next((m for m in DIRECTIONS if rest.startswith(m)), None)
        if move is None:
            raise ConfigError(
                f"camera_control_direction={direction!r} is not accepted; combine {', '.join(DIRECTIONS)} "
                "(e.g. 'Left', 'RightDown')"
            )
        moves.append(move)
        rest = rest[len(move) :]
    return tuple(moves)


def check_origin(origin) -> tuple[float, ...]:
    """The starting pose: `DEFAULT_ORIGIN` for None, else 19 finite real numbers (the CameraCtrl pose above)."""
    if origin is None:
        return tuple(float(v) for v in DEFAULT_ORIGIN)
    origin = origin.tolist() if hasattr(origin, "tolist") else origin  # a numpy array or tensor of 19
    values = list(origin) if isinstance(origin, Sequence) and not isinstance(origin, str) else None
    if values is not None and len(values) != 19 and all(_real(v) for v in values):
        raise ConfigError(f"camera_control_origin has {len(values)} numbers; a pose has 19 (see wan/camera.py)")
    if values is None or len(values) != 19 or not all(_real(v) for v in values):
        shown = repr(origin) if len(repr(origin)) <= 60 else repr(origin)[:57] + "..."
        raise ConfigError(
            f"camera_control_origin={shown} is not accepted; give a pose of 19 numbers [time, fx, fy, cx, cy, 0, 0, "
            "w2c (3 x 4, row-major)] (default: camera.DEFAULT_ORIGIN)"
        )
    return tuple(float(v) for v in values)


def check_speed(speed) -> float:
    """The move per frame: `DEFAULT_SPEED` for None, else a finite real number."""
    if speed is None:
        return DEFAULT_SPEED
    if not _real(speed):
        raise ConfigError(f"camera_control_speed={speed!r} is not accepted; use a number (DiffSynth-Studio: 1/54)")
    return float(speed)


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def camera_path(direction: str, num_frames: int, speed: float = DEFAULT_SPEED, origin: Sequence[float] | None = None):
    """`num_frames` poses starting at `origin`, each moved by `speed` from the one before along `direction`."""
    moves = check_direction(direction)
    pose = list(check_origin(origin))
    poses = [pose]
    for _ in range(num_frames - 1):
        pose = list(pose)
        for move in moves:
            index, sign = _MOVES[move]
            pose[index] += sign * float(speed)
        poses.append(pose)
    return poses


def plucker_embedding(poses, height: int, width: int) -> torch.Tensor:
    """Plücker coordinates `[F, H, W, 6]` (float32) of every pixel's ray in every pose, relative to the first pose.

    The poses' intrinsics belong to a 1280 x 720 frame; for another aspect ratio the focal length of the longer
    side is rescaled so the field of view of the shorter one is kept (CameraCtrl's rule)."""
    poses = torch.tensor(poses, dtype=torch.float64)
    fx, fy, cx, cy = poses[:, 1].clone(), poses[:, 2].clone(), poses[:, 3], poses[:, 4]
    pose_ratio, ratio = POSE_SIZE[0] / POSE_SIZE[1], width / height
    if pose_ratio > ratio:
        fx = height * pose_ratio * fx / width
    else:
        fy = width / pose_ratio * fy / height
    fx, fy, cx, cy = fx * width, fy * height, cx * width, cy * height
    w2c = torch.eye(4, dtype=torch.float64).repeat(len(poses), 1, 1)
    w2c[:, :3] = poses[:, 7:].reshape(-1, 3, 4)
    c2w = torch.linalg.inv(w2c)
    relative = w2c[0] @ c2w  # every camera in the first camera's frame (the first becomes the identity)
    relative[0] = torch.eye(4, dtype=torch.float64)
    relative = relative.float()
    rows, cols = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    x = (cols[None] - cx.float()[:, None, None]) / fx.float()[:, None, None]
    y = (rows[None] - cy.float()[:, None, None]) / fy.float()[:, None, None]
    directions = torch.stack([x, y, torch.ones_like(x)], dim=-1)  # [F, H, W, 3] in camera coordinates
    directions = directions / directions.norm(dim=-1, keepdim=True)
    directions = directions @ relative[:, None, :3, :3].transpose(-1, -2)
    origins = relative[:, None, None, :3, 3].expand_as(directions)
    return torch.cat([torch.linalg.cross(origins, directions, dim=-1), directions], dim=-1)


def pack_frames(embedding: torch.Tensor) -> torch.Tensor:
    """`[F, H, W, 6]` (F = 4k + 1) -> the adapter's input `[1, 24, k + 1, H, W]`: the first frame four times, then
    each group of four frames stacked on channels (channel `4 c + i` is channel `c` of the group's frame `i`)."""
    frames = embedding.permute(0, 3, 1, 2)  # [F, 6, H, W]
    frames = torch.cat([frames[:1].expand(4, -1, -1, -1), frames[1:]])
    groups = frames.unflatten(0, (-1, 4))  # [k + 1, 4, 6, H, W]
    return groups.transpose(1, 2).flatten(1, 2).transpose(0, 1)[None]


def camera_control_input(direction, num_frames: int, height: int, width: int, speed=None, origin=None) -> torch.Tensor:
    """What a Control-Camera DiT's adapter reads for a camera move: `[1, 24, (num_frames - 1) / 4 + 1, H, W]`."""
    poses = camera_path(direction, num_frames, check_speed(speed), origin)
    return pack_frames(plucker_embedding(poses, height, width))


__all__ = [
    "DEFAULT_ORIGIN",
    "DEFAULT_SPEED",
    "DIRECTIONS",
    "camera_control_input",
    "camera_path",
    "check_direction",
    "check_origin",
    "check_speed",
]

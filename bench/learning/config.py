"""What configures the learned method and needs no torch: the network's named architectures and the options
of ``python -m bench train``.

Kept apart from :mod:`bench.learning.model` and :mod:`bench.learning.train` (both import torch at module level),
so the command line can declare the ``train`` command, and ``python -m bench --help`` run, without torch.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters (everything needed to rebuild the network).

    Attributes
    ----------
    name : str
        Configuration name (``paper`` or ``compact``).
    patch_size : int
        Side of the square, non-overlapping patches (224 in the paper).
    stem_channels : int
        Channels of the stride-2 7x7 stem convolution (followed by a stride-2 max pool).
    stage_channels : tuple of int
        Channels of each residual stage; every stage after the first halves the resolution.
    blocks_per_stage : tuple of int
        Basic residual blocks per stage.
    combine_channels : tuple of int
        Output channels of the 3x3 stride-2 convolutions combining concatenated source/target
        features; the last one is the per-patch vector length ``D``.
    grid_channels : int
        Output channels of the 3-D convolution and of the dynamic 2-D grid convolution.
    fc_hidden : tuple of int
        Hidden widths of the fully connected head.
    groups : int
        Maximum GroupNorm group count (reduced to a divisor of the channel count when needed).
    """

    name: str
    patch_size: int = 224
    stem_channels: int = 64
    stage_channels: tuple[int, ...] = (64, 128, 256, 512)
    blocks_per_stage: tuple[int, ...] = (2, 2, 2, 2)
    combine_channels: tuple[int, ...] = (1024, 512)
    grid_channels: int = 256
    fc_hidden: tuple[int, ...] = (256,)
    groups: int = 32

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        clean = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in fields}
        return cls(**clean)


CONFIGS: dict[str, ModelConfig] = {
    # about 30.4 M parameters, as published: a ResNet-18-like extractor, wide combiner
    "paper": ModelConfig(
        name="paper",
        stem_channels=64,
        stage_channels=(64, 128, 256, 512),
        blocks_per_stage=(2, 2, 2, 2),
        combine_channels=(1024, 512),
        grid_channels=512,
        fc_hidden=(512, 128),
        groups=32,
    ),
    # about 1.06 M parameters (4 MB float32): trains and runs on 2 CPU cores
    "compact": ModelConfig(
        name="compact",
        stem_channels=16,
        stage_channels=(16, 32, 64, 128),
        blocks_per_stage=(1, 1, 1, 1),
        combine_channels=(128, 128),
        grid_channels=128,
        fc_hidden=(64,),
        groups=8,
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the training options on ``parser``."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", default="generated",
                   help="'generated' (the project's generator) or an ANHIR pair table (its 'training' split)")
    g.add_argument("--data-root", type=Path, action="append", default=[], help="extra image root for a table")
    g.add_argument("--n-train", type=int, default=64, help="generated training pairs")
    g.add_argument("--n-val", type=int, default=16, help="generated validation pairs (other seeds)")
    g.add_argument("--size", type=int, default=640, help="generated target size (longer side, pixels)")
    g.add_argument("--input-size", type=int, default=448, help="network input: longer side, pixels")
    g.add_argument("--working-size", type=int, default=None, help="preprocessing working size (default: its own)")
    g.add_argument("--cache-dir", type=Path, default=None, help="preprocessed-pair cache (default: OUT/cache)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--config", default="compact", choices=sorted(CONFIGS))
    g.add_argument("--epochs", type=int, default=20)
    g.add_argument("--real-batch", type=int, default=8, help="pairs per optimiser step")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--decay", type=float, default=0.995, help="learning-rate factor per epoch")
    g.add_argument("--loss", choices=["ncc", "relative"], default="ncc")
    g.add_argument("--loss-pool", type=int, nargs="+", default=[1],
                   help="average-pool factor(s) of the images for the loss; several = mean NCC over those scales")
    g.add_argument("--max-rotation", type=float, default=15.0, help="augmentation rotation, degrees (+-)")
    g.add_argument("--scale-range", type=float, nargs=2, default=(0.9, 1.15), help="augmentation scale range")
    g.add_argument("--max-shear", type=float, default=0.08, help="augmentation shear (+-)")
    g.add_argument("--max-translation", type=float, default=0.08, help="augmentation shift, x longer side (+-)")
    g.add_argument("--crop-probability", type=float, default=0.0,
                   help="chance of cutting both images to one random window (tissue filling the frame)")
    g.add_argument("--crop-range", type=float, nargs=2, default=(0.5, 0.9), help="window side / image side")
    g.add_argument("--gamma-range", type=float, nargs=2, default=(1.0, 1.0),
                   help="per-image gamma of the tissue intensities (a stain's non-linear response)")
    g.add_argument("--blur-probability", type=float, default=0.0,
                   help="per-image chance of a Gaussian blur (a stain without fine texture)")
    g.add_argument("--swap-probability", type=float, default=0.0,
                   help="chance of giving the source another section's fine texture (consecutive sections)")
    g.add_argument("--swap-sigma", type=float, default=2.0, help="scale of the swapped fine band, input pixels")
    g.add_argument("--cut-probability", type=float, default=0.0,
                   help="per-image chance of cutting it by its own random frame (frame-filling tissue, frames "
                        "that differ between scans); the loss ignores what either frame cut away")
    g.add_argument("--cut-range", type=float, nargs=2, default=(0.6, 0.9), help="that frame's side / image side")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    g = parser.add_argument_group("output")
    g.add_argument("--out", type=Path, default=Path("runs/train"), help="folder for checkpoints, plot, weights")
    g.add_argument("--weights-out", type=Path, default=None, help="also copy the final weights here")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")

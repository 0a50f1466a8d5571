"""The paper's patch-based affine network (section 2.3, Fig. 1) and its weight files (the named
configurations, :data:`~bench.learning.config.CONFIGS`, are in :mod:`bench.learning.config`).

The network takes a source and a target image of **any size and aspect ratio**, each ``(1, 1, H, W)``,
and predicts one 2x3 matrix ``theta`` in normalised coordinates, in the convention of
``torch.nn.functional.affine_grid(theta, size, align_corners=False)``: ``theta`` maps *output* (target)
normalised coordinates to *input* (source) sampling coordinates.

Forward pass:

1. both images are zero-padded (bottom/right only) to a common canvas whose sides are multiples of the
   patch size (224), then unfolded into non-overlapping patches; the patch count is the batch dimension;
2. a ResNet-like feature extractor (GroupNorm, PReLU; weights shared by source and target) maps each
   patch to a feature map;
3. source and target features are concatenated per patch and combined by 2-D convolutions into one
   vector of ``combine_channels`` per patch;
4. the patch grid is a volume ``(1, 1, D, gh, gw)``; a 3-D convolution whose depth spans the ``D``
   feature channels turns it into ``(1, grid_channels, gh, gw)``;
5. a 2-D convolution block is applied ``n = max(1, ceil((max(gh, gw) - 1) / 2))`` times (shared weights,
   built dynamically per input) so that the receptive field covers the whole grid;
6. adaptive average pooling and fully connected layers give ``theta``; the last layer is zero-initialised
   with the identity as its bias, so an untrained network predicts the identity.

:func:`theta_to_matrix` / :func:`matrix_to_theta` convert between ``theta`` and the project's 3x3 pixel
matrices (moving/source pixels -> fixed/target pixels).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.learning.config import CONFIGS, ModelConfig

WEIGHTS_FORMAT = 1


def _groups(channels: int, max_groups: int) -> int:
    g = min(max_groups, channels)
    while channels % g:
        g -= 1
    return g


def _conv_norm_act(cin: int, cout: int, k: int, stride: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
        nn.GroupNorm(_groups(cout, groups), cout),
        nn.PReLU(cout),
    )


class BasicBlock(nn.Module):
    """ResNet basic block with GroupNorm and PReLU; a 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = _conv_norm_act(cin, cout, 3, stride, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(_groups(cout, groups), cout)
        self.act = nn.PReLU(cout)
        self.skip = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.GroupNorm(_groups(cout, groups), cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm2(self.conv2(self.conv1(x))) + self.skip(x))


class FeatureExtractor(nn.Module):
    """``(P, 1, S, S)`` patches -> ``(P, C, S/32, S/32)`` features."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_norm_act(1, cfg.stem_channels, 7, 2, cfg.groups), nn.MaxPool2d(3, 2, 1)]
        cin = cfg.stem_channels
        for i, (cout, n) in enumerate(zip(cfg.stage_channels, cfg.blocks_per_stage, strict=True)):
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1, cfg.groups))
                cin = cout
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class AffineNetwork(nn.Module):
    """Source + target of any size -> ``theta`` (1, 2, 3). See the module docstring."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.features = FeatureExtractor(cfg)
        combine: list[nn.Module] = []
        cin = 2 * cfg.stage_channels[-1]
        for cout in cfg.combine_channels:
            combine.append(_conv_norm_act(cin, cout, 3, 2, cfg.groups))
            cin = cout
        combine.append(nn.AdaptiveAvgPool2d(1))
        self.combiner = nn.Sequential(*combine)
        depth = cfg.combine_channels[-1]
        self.volume = nn.Sequential(
            nn.Conv3d(1, cfg.grid_channels, (depth, 3, 3), padding=(0, 1, 1), bias=False),
            nn.GroupNorm(_groups(cfg.grid_channels, cfg.groups), cfg.grid_channels),
            nn.PReLU(cfg.grid_channels),
        )
        self.grid_conv = _conv_norm_act(cfg.grid_channels, cfg.grid_channels, 3, 1, cfg.groups)
        head: list[nn.Module] = []
        cin = cfg.grid_channels
        for width in cfg.fc_hidden:
            head += [nn.Linear(cin, width), nn.PReLU(width)]
            cin = width
        self.head = nn.Sequential(*head)
        self.out = nn.Linear(cin, 6)
        nn.init.zeros_(self.out.weight)
        with torch.no_grad():
            self.out.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))

    def unfold(self, image: torch.Tensor, canvas: tuple[int, int]) -> torch.Tensor:
        """``(1, 1, H, W)`` -> ``(gh * gw, 1, S, S)`` patches of the zero-padded ``canvas``."""
        s = self.config.patch_size
        h, w = image.shape[-2:]
        padded = F.pad(image, (0, canvas[1] - w, 0, canvas[0] - h))
        patches = padded.unfold(2, s, s).unfold(3, s, s)  # (1, 1, gh, gw, S, S)
        return patches.reshape(-1, 1, s, s)

    def grid_shape(self, *shapes: tuple[int, int]) -> tuple[int, int]:
        """Patch grid ``(gh, gw)`` of the common canvas of images of the given ``(H, W)`` shapes."""
        s = self.config.patch_size
        return (
            max(math.ceil(sh[0] / s) for sh in shapes),
            max(math.ceil(sh[1] / s) for sh in shapes),
        )

    @staticmethod
    def n_grid_convs(grid: tuple[int, int]) -> int:
        """Dynamic 3x3 grid convolutions needed for the receptive field to span the grid."""
        return max(1, math.ceil((max(grid) - 1) / 2))

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``source`` ``(1, 1, Hs, Ws)``, ``target`` ``(1, 1, Ht, Wt)`` -> ``theta`` ``(1, 2, 3)``."""
        gh, gw = self.grid_shape(source.shape[-2:], target.shape[-2:])
        s = self.config.patch_size
        canvas = (gh * s, gw * s)
        patches = torch.cat([self.unfold(source, canvas), self.unfold(target, canvas)], 0)
        feats = self.features(patches)
        n = gh * gw
        combined = self.combiner(torch.cat([feats[:n], feats[n:]], 1)).flatten(1)  # (n, D)
        volume = combined.t().reshape(1, 1, -1, gh, gw)  # (1, 1, D, gh, gw)
        x = self.volume(volume).squeeze(2)  # (1, grid_channels, gh, gw)
        for _ in range(self.n_grid_convs((gh, gw))):
            x = self.grid_conv(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.out(self.head(x)).view(1, 2, 3)


def build_model(config_name: str | ModelConfig) -> AffineNetwork:
    """Build a named configuration (``paper`` or ``compact``) or an explicit :class:`ModelConfig`."""
    if isinstance(config_name, ModelConfig):
        return AffineNetwork(config_name)
    if config_name not in CONFIGS:
        raise ValueError(f"unknown model configuration {config_name!r}; known: {', '.join(CONFIGS)}")
    return AffineNetwork(CONFIGS[config_name])


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# Weight files


def save_weights(model: AffineNetwork, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write config name, architecture hyper-parameters, state dict and ``meta`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": WEIGHTS_FORMAT,
        "config_name": model.config.name,
        "architecture": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": json.loads(json.dumps(meta or {}, default=str)),  # plain types only: loads with weights_only
    }
    torch.save(payload, path)
    return path


def load_weights(path: str | Path, expected_config: str | None = None) -> tuple[AffineNetwork, dict[str, Any]]:
    """Rebuild the network stored in ``path``; returns ``(model in eval mode, meta)``.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        The file is not a weight file of this project, its architecture differs from
        ``expected_config``'s, or its state dict does not fit its declared architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weight file not found")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or "architecture" not in payload or "state_dict" not in payload:
        raise ValueError(f"{path}: not a weight file of the learned method (no architecture/state_dict)")
    cfg = ModelConfig.from_dict(payload["architecture"])
    if expected_config is not None:
        expected = CONFIGS.get(expected_config)
        if expected is None:
            raise ValueError(f"unknown expected configuration {expected_config!r}; known: {', '.join(CONFIGS)}")
        if cfg != expected:
            raise ValueError(
                f"{path}: weights are for architecture {cfg.name!r} ({_describe(cfg)}), "
                f"expected {expected.name!r} ({_describe(expected)})"
            )
    model = AffineNetwork(cfg)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: state dict does not fit architecture {cfg.name!r}: {exc}") from None
    model.eval()
    return model, dict(payload.get("meta", {}))


def _describe(cfg: ModelConfig) -> str:
    return f"stages {list(cfg.stage_channels)}, combine {list(cfg.combine_channels)}, grid {cfg.grid_channels}"


# ---------------------------------------------------------------------------------------------
# theta (normalised, affine_grid convention) <-> 3x3 pixel matrices


def normalise_matrix(shape: tuple[int, int]) -> np.ndarray:
    """3x3 map from pixel ``(x, y)`` of an ``(H, W)`` image to ``align_corners=False`` normalised coords.

    Pixel centres at integers: ``x_n = (2 x + 1) / W - 1``, so the image border lies at -1 and +1.
    """
    h, w = shape
    return np.array([[2.0 / w, 0.0, 1.0 / w - 1.0], [0.0, 2.0 / h, 1.0 / h - 1.0], [0.0, 0.0, 1.0]])


def theta_to_matrix(theta: np.ndarray, source_shape: tuple[int, int], target_shape: tuple[int, int]) -> np.ndarray:
    """``theta`` (2x3, target normalised -> source normalised) -> 3x3 source pixels -> target pixels.

    ``source_shape`` / ``target_shape`` are the ``(H, W)`` of the grids theta was applied to (the
    sampled input and the output of ``grid_sample``).
    """
    t = np.vstack([np.asarray(theta, np.float64).reshape(2, 3), [0.0, 0.0, 1.0]])
    target_to_source = np.linalg.inv(normalise_matrix(source_shape)) @ t @ normalise_matrix(target_shape)
    return np.linalg.inv(target_to_source)


def matrix_to_theta(matrix: np.ndarray, source_shape: tuple[int, int], target_shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`theta_to_matrix`: 3x3 source -> target pixels to a 2x3 ``theta``."""
    m = np.asarray(matrix, np.float64)
    if m.shape == (2, 3):
        m = np.vstack([m, [0.0, 0.0, 1.0]])
    t = normalise_matrix(source_shape) @ np.linalg.inv(m) @ np.linalg.inv(normalise_matrix(target_shape))
    return t[:2]


def warp(source: torch.Tensor, theta: torch.Tensor, out_shape: tuple[int, int]) -> torch.Tensor:
    """Warp ``source`` ``(1, C, H, W)`` by ``theta`` ``(1, 2, 3)`` onto an ``out_shape`` grid (zeros outside)."""
    grid = F.affine_grid(theta, [1, source.shape[1], *out_shape], align_corners=False)
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

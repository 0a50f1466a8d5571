"""``learned``: the paper's patch-based affine network (section 2.3, Algorithm 1 step 7), one forward pass.

Runs on the output of the shared preprocessing (masked, inverted, initial rotation already applied to the
moving image); the harness composes the returned working-frame matrix with that rotation (step 8).
Both images are resampled by one common factor so the longer side of the larger is ``input_size`` (the
size the network was trained at, read from the weight file unless overridden), then passed through the
network, whose ``theta`` is converted to a pixel matrix and mapped back to the working frame.

Weights: the ``compact`` configuration trained here and shipped in ``methods/weights/compact.pt`` (see
``MODEL_CARD.md`` beside it) unless ``weights=PATH`` names another file (``--set learned.weights=PATH``),
e.g. ``paper``-configuration weights trained elsewhere; the architecture is read from the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench import Context, Estimate, ImageView, Method, register
from bench.geometry import resample_matrix

SHIPPED_WEIGHTS = Path(__file__).parent / "weights" / "compact.pt"


@dataclass(frozen=True)
class LearnedParams:
    """Parameters of :class:`Learned`."""

    weights: str = ""  # path to a weight file; "" = the shipped compact weights
    input_size: int = 0  # longer side of the network input in pixels; 0 = as trained (from the file)
    config: str = ""  # expected architecture ("paper", "compact"); "" = accept the file's
    passes: int = 1  # forward passes; each one after the first refines the previous warp (1 = the paper)
    threads: int = 1  # torch CPU threads during a call (0 = torch's default); 1: steady times on shared cores
    guard: bool = False  # keep the preprocessing's alignment when the prediction lowers the training objective
    fov: bool = True  # cut both inputs to their common field of view (frame edges are not tissue outlines)
    symmetric: bool = False  # also predict target -> source; return the geometric mean of the two (2 passes)


@register
class Learned(Method):
    name = "learned"
    version = "2"
    description = "The paper's patch-based affine network (unsupervised, NCC), one forward pass after preprocessing."
    uses_preprocessing = True
    devices = ("cpu", "cuda")
    requires = ("torch",)
    known_limits = {  # contract checks it fails by design (bench.conformance)
        "recovers_rotation": "recovers about a quarter of a 6 degree rotation (median error 0.02 of the "
        "diagonal): trained on pairs whose rotation the shared preprocessing had already removed",
    }

    Params = LearnedParams

    def prepare(self, context: Context) -> None:
        from bench.learning.model import load_weights

        path = Path(self.params.weights) if self.params.weights else SHIPPED_WEIGHTS
        self._model, meta = load_weights(path, expected_config=self.params.config or None)
        self._device = self.device_for(context.device)
        self._model.to(self._device)
        trained = int(meta.get("data", {}).get("input_size", 448))
        self._input_size = self.params.input_size or trained
        self._weights = str(path)
        # no torch.use_deterministic_algorithms: the forward pass on CPU (convolutions, group norms, pooling,
        # linear layers) is deterministic already (tested), the flag is global to the process, and in torch
        # 2.13 setting it imports torch._inductor: about 2 s of every worker's start

    def estimate(self, fixed: ImageView, moving: ImageView, context: Context) -> Estimate:
        from bench.learning.data import common_canvas, common_view, input_scales, resize

        if not hasattr(self, "_model"):
            self.prepare(context)
        _, (ms, fs) = input_scales([moving.shape, fixed.shape], self._input_size)
        mv = resize(np.where(moving.mask, moving.image, 0.0), ms)
        fx = resize(np.where(fixed.mask, fixed.image, 0.0), fs)
        mv, fx = common_canvas(mv, fx)  # bottom/right zero padding: pixel coordinates unchanged
        if self.params.fov:  # as in training: both inputs get the same frame edges
            views = [np.ones(s, bool) if v.valid is None else resize(v.valid, s)
                     for v, s in ((moving, ms), (fixed, fs))]
            common = common_view(*common_canvas(*views))
            mv, fx = mv * common, fx * common
        net, theta = self._predict(mv, fx)
        if self.params.symmetric:  # inverse consistent: swapping the inputs inverts the result exactly
            net = symmetric_mean(net, self._predict(fx, mv)[0])
        objective: dict[str, float] = {}
        if self.params.guard:  # only then: the paper's method is the forward pass alone, and it is timed
            objective = self._objective(mv, fx, net)
            if objective["predicted"] < objective["identity"]:
                net = np.eye(3)
        r_m = resample_matrix(ms[1] / moving.shape[1], ms[0] / moving.shape[0])
        r_f = resample_matrix(fs[1] / fixed.shape[1], fs[0] / fixed.shape[0])
        matrix = np.linalg.inv(r_f) @ net @ r_m
        grid = self._model.grid_shape(mv.shape)
        return Estimate(matrix, {
            "config": self._model.config.name,
            "n_patches": int(grid[0] * grid[1]),
            "grid": list(grid),
            "input_shape_moving": list(ms),
            "input_shape_fixed": list(fs),
            "theta": np.round(theta, 6).tolist(),
            "passes": self.params.passes,
            "symmetric": self.params.symmetric,
            "weights": Path(self._weights).name,
            **({"ncc_identity": round(objective["identity"], 5), "ncc_predicted": round(objective["predicted"], 5),
                "kept_start": objective["predicted"] < objective["identity"]} if objective else {}),
        })

    def _objective(self, moving: np.ndarray, fixed: np.ndarray, matrix: np.ndarray) -> dict[str, float]:
        """The training objective (mean NCC over the 2x, 4x and 8x pooled images) at the identity and at
        ``matrix`` (moving -> fixed pixels on the common canvas): a check the network cannot make itself."""
        import torch
        import torch.nn.functional as F

        from bench.learning.data import as_input
        from bench.learning.model import matrix_to_theta, warp
        from bench.learning.train import ncc

        shape = fixed.shape
        mv, fx = as_input(moving), as_input(fixed)
        out = {}
        with torch.inference_mode():
            for key, m in (("identity", np.eye(3)), ("predicted", matrix)):
                theta = torch.from_numpy(matrix_to_theta(m, shape, shape)).float()[None]
                vals = []
                for k in (2, 4, 8):
                    a, b = F.avg_pool2d(mv, k, ceil_mode=True), F.avg_pool2d(fx, k, ceil_mode=True)
                    vals.append(float(ncc(warp(a, theta, tuple(b.shape[-2:])), b)))
                out[key] = float(np.mean(vals))
        return out

    def _predict(self, moving: np.ndarray, fixed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel matrix (3x3, moving -> fixed) on one common ``(H, W)`` canvas, and the last ``theta``."""
        import torch

        from bench.learning.data import as_input
        from bench.learning.model import matrix_to_theta, theta_to_matrix, warp

        shape = fixed.shape
        to = lambda a: as_input(a).to(self._device)  # noqa: E731
        mv, fx = to(moving), to(fixed)
        total = np.eye(3)
        before = torch.get_num_threads()
        if self._device == "cpu" and self.params.threads > 0:
            torch.set_num_threads(self.params.threads)  # a 224-px forward gains nothing from more threads
        try:
            with torch.inference_mode():
                for k in range(max(1, self.params.passes)):
                    current = mv if k == 0 else warp(mv, to(matrix_to_theta(total, shape, shape))[0], shape)
                    theta = self._model(current, fx)[0].double().cpu().numpy()
                    total = theta_to_matrix(theta, shape, shape) @ total
        finally:
            torch.set_num_threads(before)
        return total, theta


def symmetric_mean(forward: np.ndarray, backward: np.ndarray) -> np.ndarray:
    """The affine half-way between ``forward`` (moving -> fixed) and ``inv(backward)`` (``backward``: fixed ->
    moving): ``expm((logm(F) - logm(B)) / 2)``. Swapping the two inputs gives exactly the inverse, and two
    identical images give the identity whatever bias the network has.

    >>> a = np.array([[1.1, 0.05, 3.0], [-0.02, 0.95, -2.0], [0, 0, 1]])
    >>> bool(np.allclose(symmetric_mean(a, np.linalg.inv(a)), a))
    True
    >>> bool(np.allclose(symmetric_mean(a, a), np.eye(3)))
    True
    """
    from scipy.linalg import expm, logm

    out = np.real(expm(0.5 * (logm(forward) - logm(backward))))
    out[2] = [0.0, 0.0, 1.0]
    return out

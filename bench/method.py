"""The method contract: what every registration method receives and returns.

A method never reads files, computes metrics or times itself: the harness does all of that. It gets
the two images of one pair in a *working frame* (after the shared preprocessing, when it uses it) and
returns an :class:`Estimate`: an affine matrix that maps **moving (source) working-frame points into the
fixed (target) working frame**. The harness turns that into one matrix in original pixel coordinates.
A nonrigid method (``kind = "nonrigid"``) may add a :class:`bench.deformation.Deformation`: a dense
displacement field on the fixed working frame that refines the matrix (see :class:`Estimate`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from bench.geometry import as_3x3

if TYPE_CHECKING:
    from bench.deformation import Deformation


class RegistrationFailed(RuntimeError):
    """Raised by a method that detects that it could not register the pair (with the reason).

    The harness records the pair as ``failed`` with this message instead of scoring a wild matrix.
    """


@dataclass(frozen=True)
class ImageView:
    """One image of a pair, as a method sees it.

    Attributes
    ----------
    image : (H, W) float32 array in [0, 1]
        Grayscale, inverted (tissue bright, glass dark); outside ``mask`` it is 0 when the shared
        preprocessing ran.
    mask : (H, W) bool array
        Tissue mask (all True when the method does not use the shared preprocessing).
    rgb : (H, W, 3) uint8 array or None
        The colour image in the same frame, for methods that want colour.
    valid : (H, W) bool array or None
        Field of view: where the image has data. The preprocessing sets it on the moving image (the
        source's frame after the initial transform; outside it the image is filled, not scanned);
        ``None`` means everywhere. Tissue cut by a frame edge ends there, and that edge is not an outline.
    """

    image: np.ndarray
    mask: np.ndarray
    rgb: np.ndarray | None = None
    valid: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape[:2]


@dataclass(frozen=True)
class Context:
    """What a method may know about the call besides the images."""

    device: str = "cpu"
    seed: int = 0
    pair_id: str = ""


@dataclass
class Estimate:
    """A method's answer: ``matrix`` (2x3 or 3x3) maps moving working-frame points to the fixed frame.

    ``diagnostics`` holds JSON-serialisable extras (inlier counts, optimiser stop condition...).
    ``frame="original"`` says the matrix is already in original pixel coordinates (source -> target), so
    the harness uses it as it is instead of composing it with the resampling and the preprocessing; the
    ``identity`` method uses it, because the two images' working frames differ by the rounding of their
    resampled sizes and a working-frame identity is then not exactly the identity.

    ``deformation`` (optional, nonrigid methods): a :class:`bench.deformation.Deformation`, a dense
    displacement field ``u`` on the fixed working frame (its ``shape`` is the fixed working shape). With
    it, the fixed working point ``x`` corresponds to the moving working point ``M^-1 (x + u(x))``, ``M``
    being ``matrix``; with ``u = 0`` that is the affine meaning. A method may return a matrix and a
    deformation (a pure deformation: the identity matrix). Only with ``frame="working"``. The constructor
    checks that it is a Deformation with a ``shape``; the harness checks it further
    (:func:`bench.deformation.check`).

    ``start`` (optional, with a deformation): the affine (3x3, working frame, moving -> fixed) the nonrigid
    part started from, e.g. the initial method's result in ``sift>deformable`` (set by the composition). The
    harness scores it as the row's start (``start_rtre_median``); None means ``matrix`` itself.
    """

    matrix: np.ndarray
    diagnostics: dict[str, Any] = field(default_factory=dict)
    frame: str = "working"
    deformation: Deformation | None = None
    start: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.matrix = as_3x3(self.matrix)
        if self.frame not in ("working", "original"):
            raise ValueError(f"Estimate.frame must be 'working' or 'original', got {self.frame!r}")
        if self.deformation is not None:
            from bench.deformation import Deformation

            if not isinstance(self.deformation, Deformation):
                raise ValueError(f"Estimate.deformation must be a bench.deformation.Deformation, "
                                 f"got {type(self.deformation).__name__}")
            shape = getattr(self.deformation, "shape", None)
            if shape is None or len(shape) != 2 or min(shape) < 1:
                raise ValueError(f"Estimate.deformation needs the fixed working shape (H, W), got {shape!r}")
            if self.frame != "working":
                raise ValueError("Estimate.deformation is only meaningful with frame='working'")
        if self.start is not None:
            self.start = as_3x3(self.start)


@dataclass(frozen=True)
class NoParams:
    """Parameters of a method that has none."""


class Method:
    """Base class of every registration method. Subclass it in one file under ``methods/``.

    Class attributes to set:

    ``name``
        registry key (lower-case, used on the command line);
    ``kind``
        ``"affine"`` (the default: ``estimate`` returns a matrix) or ``"nonrigid"`` (it may also return a
        :class:`bench.deformation.Deformation` in ``Estimate.deformation``; ``bench list`` shows the kind);
    ``version``
        bump it whenever the method's behaviour changes (it is stored in every result row);
    ``uses_preprocessing``
        True: gets the output of the shared preprocessing (masked, inverted, initial rotation applied);
        False: gets the images resampled to the working size only (grayscale, inverted, no mask);
    ``devices``
        devices it can run on, e.g. ``("cpu", "cuda")``;
    ``requires``
        importable module names of optional dependencies; missing ones make it *unavailable*;
    ``Params``
        a frozen dataclass of typed, defaulted parameters (``Method()`` must always work); the
        ``# comment`` after each field is its one-line description (``python -m bench list NAME``);
    ``known_limits``
        contract checks (:mod:`bench.conformance`) the method fails *by design*, each with the reason,
        e.g. ``{"recovers_rotation": "estimates a translation only"}``. ``python -m bench check`` and
        the test suite then expect the failure (and report a limit that no longer fails).
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "affine"
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    uses_preprocessing: ClassVar[bool] = True
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    requires: ClassVar[tuple[str, ...]] = ()
    Params: ClassVar[type] = NoParams
    known_limits: ClassVar[dict[str, str]] = {}

    def __init__(self, **params: Any) -> None:
        self.params = make_params(self.Params, params, owner=self.name)

    # -- availability -------------------------------------------------------------------------
    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when the method can run here, else why not (checked without importing anything)."""
        missing = [m for m in cls.requires if importlib.util.find_spec(m) is None]
        if missing:
            return f"missing optional dependency: {', '.join(missing)}"
        return None

    # -- lifecycle ----------------------------------------------------------------------------
    def prepare(self, context: Context) -> None:
        """Once per process before the first call (load weights, build models). Not timed."""

    def estimate(self, fixed: ImageView, moving: ImageView, context: Context) -> Estimate:
        """Return the affine matrix mapping ``moving`` working-frame points into ``fixed``'s frame (and, for a
        nonrigid method, optionally a deformation: :class:`Estimate`)."""
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------------------------
    def device_for(self, requested: str) -> str:
        """The device this method will actually use for a requested one."""
        return requested if requested in self.devices else self.devices[0]

    def params_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.params)

    def params_json(self) -> str:
        return json.dumps(self.params_dict(), sort_keys=True, default=str)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params_dict()})"


@dataclass(frozen=True)
class ParamInfo:
    """One parameter as ``bench list NAME`` shows it."""

    name: str
    type: str
    default: Any
    help: str


def describe_params(params_cls: type) -> list[ParamInfo]:
    """Name, type, default and one-line description of every field of a parameters dataclass.

    The description is the field's ``metadata["help"]`` when given, else the ``# comment`` that ends the
    field's line in the source (the style of every method here), else the comment lines just above it.

    >>> @dataclass(frozen=True)
    ... class P:
    ...     ratio: float = 0.8  # Lowe's ratio test
    ...     mode: typing.Literal["a", "b"] = "a"
    >>> [(p.name, p.type, p.default) for p in describe_params(P)]
    [('ratio', 'float', 0.8), ('mode', "'a' | 'b'", 'a')]
    """
    hints = typing.get_type_hints(params_cls)
    comments: dict[str, str] = {}
    for base in reversed(params_cls.__mro__):  # fields inherited from a base dataclass keep its comments
        if dataclasses.is_dataclass(base):
            comments.update(_field_comments(base))
    out = []
    for f in dataclasses.fields(params_cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        help_text = str(f.metadata.get("help", "")) or comments.get(f.name, "")
        out.append(ParamInfo(f.name, _type_name(hints.get(f.name, f.type)), default, help_text))
    return out


def _type_name(typ: Any) -> str:
    if typing.get_origin(typ) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(typ))
    if isinstance(typ, type) and typing.get_origin(typ) is None:
        return typ.__name__
    return str(typ).replace("typing.", "").replace("NoneType", "None")


def _field_comments(cls: type) -> dict[str, str]:
    """``{field: comment}`` from the class body's source: the comment ending a field's line, else the
    comment lines just above it. Read with :mod:`tokenize`, so a ``#`` inside a string is no comment;
    empty when the source is not available (e.g. a class made in an interactive session)."""
    import inspect
    import io
    import textwrap
    import tokenize

    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    above: list[str] = []
    line_start, first, field_name, depth, class_indent = True, None, None, 0, None
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return {}
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.INDENT and class_indent is None:
            class_indent = tok.end[1]
        if tok.type == tokenize.COMMENT:
            if field_name and tok.start[0] == first:
                comments[field_name] = tok.string.lstrip("#").strip()
            elif line_start:
                above.append(tok.string.lstrip("#").strip())
            continue
        if tok.type in (tokenize.NL, tokenize.INDENT, tokenize.DEDENT):
            if tok.type == tokenize.NL and line_start and not tok.line.strip():
                above = []  # a blank line ends a comment block
            continue
        if tok.type == tokenize.NEWLINE:
            line_start, field_name = True, None
            continue
        if tok.type == tokenize.OP:
            depth += tok.string in "([{"
            depth -= tok.string in ")]}"
        if line_start:
            line_start, first = False, tok.start[0]
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            at_body = class_indent is not None and tok.start[1] == class_indent and depth == 0
            if tok.type == tokenize.NAME and at_body and nxt is not None and nxt.string == ":":
                field_name = tok.string
                if above:
                    comments[field_name] = " ".join(above)
            above = []
    return comments


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert a command-line string to a dataclass field's declared type."""
    if not isinstance(value, str):
        return value
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value.lower() in ("none", "null", "") and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ValueError:
                continue
        raise ValueError(f"{where}: cannot read {value!r} as {typ}")
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if typ is bool:
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where}: {value!r} is not a boolean (true/false)")
    if typ in (int, float, str):
        try:
            return typ(value)
        except ValueError:
            raise ValueError(f"{where}: {value!r} is not a valid {typ.__name__}") from None
    if origin is tuple:
        parts = [p for p in value.strip("()[] ").split(",") if p.strip()]
        inner = args[0] if args else str
        return tuple(_coerce(p.strip(), inner, where) for p in parts)
    return value


def make_params(params_cls: type, values: dict[str, Any], owner: str = "") -> Any:
    """Build a parameters dataclass, converting strings to the declared types, refusing unknown keys."""
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    hints = typing.get_type_hints(params_cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        import difflib

        hints_txt = []
        for u in unknown:
            close = difflib.get_close_matches(u, list(fields), n=1)
            hints_txt.append(f"{u!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        known = ", ".join(fields) or "none"
        raise ValueError(f"{owner or params_cls.__name__}: unknown parameter {', '.join(hints_txt)}; known: {known}")
    converted = {k: _coerce(v, hints[k], f"{owner}.{k}") for k, v in values.items()}
    for k, v in converted.items():  # a NaN compares false with everything: a threshold of NaN disables its check
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{owner or params_cls.__name__}.{k}: {v!r} is not a finite number")
    return params_cls(**converted)

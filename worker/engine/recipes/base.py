"""What a recipe is: its metadata, its declarative option table and its handler's context and output.

Light on purpose: the API imports these tables (to parse options, build the upload form, document the job
schema), so nothing here imports onnx, numpy, ONNX Runtime or torch. Handlers import those when they run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from worker.engine.errors import EngineError

if TYPE_CHECKING:  # the handlers' types only: importing these at run time would pull in ONNX Runtime
    from worker.engine.config import QuantizeConfig, RecipeOptions
    from worker.engine.context import ProgressFn, RunData
    from worker.engine.inspect import ModelInfo
    from worker.engine.int4 import Int4Result
    from worker.engine.preflight import Split
    from worker.engine.pt2 import Pt2Source
    from worker.engine.qat import QatResult

OptionKind = Literal["bool", "int", "float", "choice", "names", "roles"]


@dataclass(frozen=True)
class Conflict:
    """This option at ``value`` refuses ``other`` at ``other_value`` (checked once both are parsed)."""

    value: Any
    other: str
    other_value: Any
    message: str


@dataclass(frozen=True)
class Option:
    """One recipe option: how a JSON value is checked, its default and one line of help.

    ``default`` must equal the RecipeOptions field of the same name (tests check it); None with ``nullable``
    means the run decides (int4's algorithm, fp16's op_block_list), and a JSON null is taken as "the default".
    """

    name: str
    kind: OptionKind
    default: Any
    help: str
    lo: float | None = None
    hi: float | None = None
    # float only: the upper bound itself is refused (percentile < 100).
    open_hi: bool = False
    choices: tuple[Any, ...] = ()
    nullable: bool = False
    # A bool option that must be true for this one to apply (int4's int8 calibration options).
    requires: str | None = None
    conflicts: tuple[Conflict, ...] = ()

    def with_(self, **changes: Any) -> Option:
        """The same option with some fields changed (a recipe's own default, help or requirement)."""
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """Type, bounds or choices and default, in words (for --help, the OpenAPI text and the README table)."""
        if self.kind == "bool":
            kind = "true/false"
        elif self.kind in ("int", "float"):
            kind = f"{'integer' if self.kind == 'int' else 'number'} {_num(self.lo)}-{_num(self.hi)}"
            if self.open_hi:
                kind += " (upper bound excluded)"
        elif self.kind == "choice":
            kind = " | ".join(str(c) for c in self.choices)
        elif self.kind == "names":
            kind = "list of strings"
        else:
            kind = "{output name: role}"
        default = "decided at run time" if self.default is None else "{}" if self.kind == "roles" else _json(
            self.default)
        extra = f"; only with {self.requires}: true" if self.requires else ""
        return f"{kind}, default {default}{extra}"

    def parse(self, value: Any, roles: tuple[str, ...]) -> Any:
        """The checked value, or EngineError('invalid_option') with the message the API has always given."""
        name = self.name
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            raise EngineError("invalid_option", f"option '{name}' must be true or false, got {value!r}")
        if self.kind == "int":
            assert self.lo is not None and self.hi is not None
            lo, hi = int(self.lo), int(self.hi)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise EngineError(
                    "invalid_option", f"option '{name}' must be an integer from {lo} to {hi}, got {value!r}"
                )
            return value
        if self.kind == "float":
            assert self.lo is not None and self.hi is not None
            lo_f, hi_f = float(self.lo), float(self.hi)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok:
                ok = lo_f < float(value) < hi_f if self.open_hi else lo_f <= float(value) <= hi_f
            if not ok:
                raise EngineError(
                    "invalid_option", f"option '{name}' must be a number between {lo_f} and {hi_f}, got {value!r}"
                )
            return float(value)
        if self.kind == "choice":
            if value not in self.choices or isinstance(value, bool):
                raise EngineError(
                    "invalid_option",
                    f"option '{name}' must be one of {', '.join(map(str, self.choices))}, got {value!r}",
                )
            return value
        if self.kind == "names":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise EngineError("invalid_option", f"option '{name}' must be a list of strings, got {value!r}")
            return tuple(value)
        # roles: {output name: role}, kept as sorted pairs so the frozen options stay hashable and comparable.
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise EngineError(
                "invalid_option",
                f"option '{name}' must map output names to roles ({', '.join(roles)}), got {value!r}",
            )
        for output, role in value.items():
            if role not in roles:
                raise EngineError(
                    "invalid_option",
                    f"option '{name}': output '{output}' has role {role!r}; choose one of {', '.join(roles)}",
                )
        return tuple(sorted(value.items()))


def _num(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


def _json(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[]" if not value else str(list(value))
    if isinstance(value, str):
        return value
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class FormField:
    """A field of the upload form this recipe uses: the form's input name and the option it sets."""

    input: str
    option: str


@dataclass
class RecipeContext:
    """What a recipe's quantize step reads and writes, handed over by the pipeline.

    The pipeline has already prepared the model (``norm_path``, ``normalized``), planned the data split and
    opened the original model; the handler writes the quantized model to ``quant_path`` and appends to
    ``warnings``.
    """

    cfg: QuantizeConfig
    opts: RecipeOptions
    info: ModelInfo
    split: Split
    data: RunData
    norm_path: Path
    normalized: Any  # onnx.ModelProto (typed loosely so this module needs no onnx import)
    quant_path: Path
    work: Path
    providers: list[str]
    step: ProgressFn
    warnings: list[str]
    env: dict[str, str | None]
    model_sha: str
    source: Pt2Source | None


@dataclass
class RecipeOutput:
    """What the rest of the run (validation, report) needs from the quantize step."""

    calibration: dict[str, Any] | None = None
    # int8_static: the calibrated activation ranges (per-layer sensitivity reuses them).
    static_ranges: dict[str, tuple[float, float]] | None = None
    int4: Int4Result | None = None
    qat: QatResult | None = None
    # int8_static: what SmoothQuant did (the report's smoothquant section).
    smoothquant: dict[str, Any] | None = None
    # The float model the recipe quantized, when it rewrote the prepared one (SmoothQuant): the layer table and
    # the sensitivity analysis compare the quantized model's tensors with this model's, whose they are.
    float_model: Path | None = None
    # int8_static: what cross-layer equalization and bias correction did (the report's sections of those names).
    equalization: dict[str, Any] | None = None
    # int8_static: what learned rounding did (the report's adaround section).
    adaround: dict[str, Any] | None = None
    bias_correction: dict[str, Any] | None = None
    # int8_static: the nodes option float_index_math keeps in float (the report's index_math section).
    index_math: dict[str, Any] | None = None
    # int8_static: what option residual_16bit did (the report's residual_16bit section).
    residual_16bit: dict[str, Any] | None = None
    # int8_static: what option four_bit_weights did (the report's four_bit_weights section).
    four_bit_weights: dict[str, Any] | None = None
    # int8_static: activations that held infinity or NaN on the calibration data (they stay in float).
    nonfinite_tensors: list[str] = field(default_factory=list)
    # Run ONNX shape inference on the quantized model before the layer table (fp16: the per-layer precision
    # column reads the inferred float16 types).
    infer_shapes: bool = False


Handler = Callable[[RecipeContext], RecipeOutput]


@dataclass(frozen=True)
class Recipe:
    """One recipe: metadata, option table and handler. The handler is a function of the recipe's own module
    that imports the heavy modules it needs when it runs, so the tables stay light."""

    name: str
    label: str
    help: str
    options: tuple[Option, ...]
    # Calibration data: "required", or "optional" (used to validate and, for some options, to calibrate).
    calibration: Literal["required", "optional"]
    # The quantize step: the recipe's branch of the pipeline (auto has none: it runs other recipes).
    quantize: Handler | None
    # Short tag for artifact file names (MODEL.int8.onnx); None: the recipe's name.
    file_tag: str | None = None
    needs_pytorch: bool = False
    # auto searches for the smallest model that meets the target: without one there is nothing to meet.
    needs_accuracy_target: bool = False
    # ONNX Runtime's quantizer writes this recipe's per-channel int8 weights, which need opset 13: the model is
    # normalized to it when per_channel is on (other recipes go on, with a warning, if it cannot be had).
    per_channel_needs_opset13: bool = False
    form_fields: tuple[FormField, ...] = ()
    # Said after "X only apply to RECIPE together with OPTION: true" when a ``requires`` is not met.
    requires_note: str = ""

    @property
    def needs_calibration(self) -> bool:
        return self.calibration == "required"

    @property
    def option_names(self) -> frozenset[str]:
        return frozenset(o.name for o in self.options)

    def option(self, name: str) -> Option:
        for o in self.options:
            if o.name == name:
                return o
        raise KeyError(name)

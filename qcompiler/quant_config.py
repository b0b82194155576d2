"""QuantConfig: what is quantized and how. Python dataclasses with a JSON form for the CLI.

Defaults follow what x86's VNNI int8 dot product wants: weights int8, symmetric, per output
channel; activations uint8, asymmetric, per tensor (``activation_dtype="i8"`` gives symmetric
int8 activations instead)."""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import QCompilerError
from .ir import Node
from .ir.ops import all_ops, traits_of
from .ir.packing import Int4Groups

CALIBRATION_METHODS = ("minmax", "moving_average", "percentile", "entropy", "mse")


def _op_types() -> dict[str, tuple[str, ...]]:
    """Op-type names used in configs -> the IR ops they cover (each op's ``config_type`` trait)."""
    types: dict[str, list[str]] = {}
    for name, op in all_ops().items():
        if op.traits.config_type:
            types.setdefault(op.traits.config_type, []).append(name)
    return {k: tuple(v) for k, v in sorted(types.items())}


OP_TYPES = _op_types()

_KIND_WORDS = {"bool": "true or false", "int": "an integer", "float": "a finite number",
               "float | None": "a finite number or null", "str": "a string", "tuple[str, ...]": "a list of strings",
               "bool | None": "true, false or null"}


def _check_types(config: Any, where: str) -> None:
    """Each field of a config dataclass holds what its annotation says (JSON gives ``"no"`` for a
    bool as easily as ``false``, and ``NaN`` for a number): a wrong type is an error, not truthy."""
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), f.type
        if kind in ("bool", "bool | None"):
            ok = isinstance(value, bool) or (value is None and kind != "bool")
        elif kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind in ("float", "float | None"):
            ok = (value is None and kind != "float") or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                                         and math.isfinite(value))
        elif kind == "str":
            ok = isinstance(value, str)
        elif kind == "tuple[str, ...]":
            ok = isinstance(value, tuple) and all(isinstance(v, str) for v in value)
        else:
            ok = True
        if not ok:
            raise QCompilerError(f"{where}.{f.name} must be {_KIND_WORDS.get(kind, kind)}, got {value!r}")


@dataclass(frozen=True)
class CalibrationConfig:
    method: str = "minmax"
    percentile: float = 99.99  # for method="percentile"
    averaging_constant: float = 0.01  # for method="moving_average"
    bins: int = 2048  # histogram bins for percentile, entropy and mse

    def __post_init__(self) -> None:
        _check_types(self, "calibration")
        if self.method not in CALIBRATION_METHODS:
            raise QCompilerError(f"calibration method '{self.method}' is not one of {', '.join(CALIBRATION_METHODS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise QCompilerError(f"calibration percentile {self.percentile} must be in (50, 100]")
        if not 0.0 < self.averaging_constant <= 1.0 or self.bins < 128:
            raise QCompilerError("averaging_constant must be in (0, 1] and bins at least 128")

    def pipeline_options(self) -> str:
        """The `range-analysis{...}` options that reproduce this calibration."""
        opts = [f"method={self.method}"]
        if self.method == "percentile":
            opts.append(f"percentile={self.percentile}")
        if self.method == "moving_average":
            opts.append(f"averaging_constant={self.averaging_constant}")
        if self.method in ("percentile", "entropy", "mse") and self.bins != 2048:
            opts.append(f"bins={self.bins}")
        return ",".join(opts)


WEIGHT_DTYPES = ("i8", "i4")
PER_TOKEN_MODES = ("auto", "off", "fallback", "all")
FLOAT_PRECISIONS = ("auto", "bf16", "fp32")
DEFAULT_OP_TYPES = ("conv", "linear", "matmul", "add", "concat", "pool", "relu", "resize")


@dataclass(frozen=True)
class QuantScheme:
    """How weights and activations are quantized: the options insert-qdq and bias-correction
    take (their dataclass fields, so the pipeline string says them). ``QuantConfig.scheme()``
    expands a config into them; nothing reaches a pass any other way."""

    per_channel: bool = True  # weights per output channel (False: per tensor)
    activation_dtype: str = "u8"  # "u8": asymmetric uint8; "i8": symmetric int8
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES
    exclude: tuple[str, ...] = ()  # node source names, value names or fnmatch patterns kept float
    max_abs_range: float = 1e4  # activations calibrated beyond this (attention masks) stay float
    weight_dtype: str = "i8"  # "i4": 4-bit weights per group (conv and linear; see ir.packing)
    weight_group_size: int = 32  # i4: consecutive input weights of an output channel sharing a scale
    int8_weights: tuple[str, ...] = ()  # i4: layers (names or patterns) whose weights stay int8
    weight_only: tuple[str, ...] = ()  # layers whose weights are quantized and activations left float
    bf16: tuple[str, ...] = ()  # layers (conv, linear, matmul) run in bfloat16 instead of int8
    dynamic: tuple[str, ...] = ()  # linears and matmuls whose left operand gets per-token scales (quantize_rows)

    def check_scheme(self) -> None:
        if self.activation_dtype not in ("u8", "i8"):
            raise QCompilerError(f"activation_dtype '{self.activation_dtype}' must be 'u8' or 'i8'")
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise QCompilerError(f"weight_dtype '{self.weight_dtype}' is not one of {', '.join(WEIGHT_DTYPES)}")
        if self.weight_dtype == "i4" and not self.per_channel:
            raise QCompilerError("weight_dtype 'i4' is per group of an output channel: it needs per_channel=true")
        if not 1 <= self.weight_group_size <= 4096:
            raise QCompilerError(f"weight_group_size must be in 1..4096, got {self.weight_group_size}")
        unknown = set(self.op_types) - set(OP_TYPES)
        if unknown:
            raise QCompilerError(f"unknown op types {sorted(unknown)} (known: {', '.join(OP_TYPES)})")
        if not self.max_abs_range > 0:
            raise QCompilerError(f"max_abs_range must be a positive number, got {self.max_abs_range}")

    def quantizes(self, op: str) -> bool:
        return any(op in OP_TYPES[t] for t in self.op_types)

    def excluded(self, *names: str) -> bool:
        return _matches(names, self.exclude)

    def is_weight_only(self, node: Node) -> bool:
        return _matches(layer_names(node), self.weight_only)

    def runs_bf16(self, node: Node) -> bool:
        return _matches(layer_names(node), self.bf16)

    def runs_dynamic(self, node: Node) -> bool:
        return _matches(layer_names(node), self.dynamic)

    def int4_groups(self, node: Node) -> Int4Groups | None:
        """How ``node``'s weight is stored: 4-bit groups under ``weight_dtype="i4"`` for a layer
        with output channels (conv, linear) not named in ``int8_weights``; None: int8."""
        if self.weight_dtype != "i4" or traits_of(node.op).channel_axis is None:
            return None
        if _matches(layer_names(node), self.int8_weights):
            return None
        return Int4Groups(self.weight_group_size)


def layer_names(node: Node) -> tuple[str, ...]:
    """What a config's patterns match a layer by: its source name and its results' names."""
    return (node.source, *(v.name for v in node.outputs))


def _matches(names: tuple[str, ...], patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(n, pattern) for n in names if n for pattern in patterns)


@dataclass(frozen=True)
class LowRank:
    """Quantized low-rank factorization (the ``factorize-low-rank`` pass): each linear or
    convolution whose two factors keeping ``energy`` of its weight's squared singular values cost
    fewer weights and multiply-adds than it is replaced by them, before calibration."""

    energy: float = 0.95

    def __post_init__(self) -> None:
        _check_types(self, "low_rank")
        if not 0.0 < self.energy <= 1.0:
            raise QCompilerError(f"low_rank.energy must be in (0, 1], got {self.energy}")


@dataclass(frozen=True)
class QuantConfig:
    weight_dtype: str = "i8"  # "i4": 4-bit weights per group for conv and linear, int8 elsewhere
    weight_group_size: int = 32  # i4: consecutive input weights of an output channel sharing a scale
    per_channel: bool = True  # weights per output channel (False: per tensor)
    activation_dtype: str = "u8"  # "u8": asymmetric uint8; "i8": symmetric int8
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES
    exclude: tuple[str, ...] = ()  # node source names, value names or fnmatch patterns kept float
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    max_abs_range: float = 1e4  # activations calibrated beyond this (attention masks) stay float
    # sensitivity fallback: a layer whose error when quantized alone (local SQNR on the first
    # calibration batch) is below this stays float; None turns the fallback off
    min_layer_sqnr_db: float | None = 20.0
    # where the layers kept out of int8 run in bf16 (float_precision), the sensitivity floor of
    # linears (which have a bf16 GEMM: cheap to rescue) rises to this if higher: a transformer's
    # linears at 20-30 dB go to bf16; None: no rise
    bf16_min_layer_sqnr_db: float | None = 30.0
    # precision search: layers are kept float, the most helpful first, until every float output
    # (and each of its channel groups) reaches this SQNR on the first calibration batch; None: off
    target_output_sqnr_db: float | None = None
    bias_correction: bool = True  # shift biases by the mean error quantization adds (bias-correction pass)
    gptq: bool = False  # round linear weights compensating each column's error on calibration inputs (gptq pass)
    low_rank: LowRank | None = None  # factor nearly low-rank weights into two thinner layers first
    # balance consecutive conv/linear weight ranges channel by channel before calibration
    # (equalize-cross-layer pass: exact in float; pairs joined by relu, pooling or nothing)
    cross_layer_equalization: bool = False
    # choose each activation's range among the calibrated one, percentile and mse by the quantized
    # model's output error on the first calibration batch (search-ranges pass; a few runs per value)
    range_search: bool = False
    # SmoothQuant before calibration, each group of linears at the strength (alpha) that quantizes
    # best (smooth-quant{per_layer=true}), or left alone; None ("auto"): on where per_token is
    # (or resolves to) "all" on a graph with attention, where the two together carry a
    # transformer's outlier channels and tokens; else off
    smooth_quant: bool | None = None
    # a layer the sensitivity check or the precision search keeps float keeps its quantized weights
    # (int8 or int4) with float activations (weight-only quantization) instead of all float
    weight_only_fallback: bool = False
    # the precision of conv, linear and matmul layers kept out of int8 (by the sensitivity check or
    # the precision search): "bf16" (operands rounded to bfloat16, float32 accumulation: AMX-BF16's
    # arithmetic), "fp32", or "auto": bf16 where the build's CPU has AMX-BF16, else fp32
    float_precision: str = "auto"
    # how int8 results are rescaled: "float32" (one float32 multiply, rounded half to even: the
    # cheaper epilogue) or "fixed" (int32 multiplier and shift, 64-bit products, as gemmlowp);
    # both are exact definitions the interpreter and every kernel compute bit for bit
    requantize: str = "float32"
    # per-token dynamic int8 for linears and attention matmuls (the left operand's scales computed
    # at run time, one per row): "fallback": a layer the sensitivity check finds weak with a
    # static scale tries it before leaving int8; "all": every one; "off": never; "auto": "off"
    # where layers out of int8 run bf16 (as cheap on AMX, and more exact); where they would run
    # float32 (no native bf16: per-token int8 is ~4x cheaper), "all" on a graph with attention
    # (a matmul of two run-time tensors: its linears' rows are tokens) and "fallback" elsewhere
    per_token: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.op_types, list):
            object.__setattr__(self, "op_types", tuple(self.op_types))
        if isinstance(self.exclude, list):
            object.__setattr__(self, "exclude", tuple(self.exclude))
        _check_types(self, "QuantConfig")
        if self.low_rank is not None and not isinstance(self.low_rank, LowRank):
            raise QCompilerError(f"QuantConfig.low_rank must be a LowRank (JSON: {{\"energy\": 0.95}}) or null, "
                                 f"got {self.low_rank!r}")
        if self.float_precision not in FLOAT_PRECISIONS:
            raise QCompilerError(f"QuantConfig.float_precision '{self.float_precision}' is not one of "
                                 f"{', '.join(FLOAT_PRECISIONS)}")
        if self.per_token not in PER_TOKEN_MODES:
            raise QCompilerError(f"QuantConfig.per_token '{self.per_token}' is not one of "
                                 f"{', '.join(PER_TOKEN_MODES)}")
        if self.requantize not in ("fixed", "float32"):
            raise QCompilerError(f"QuantConfig.requantize '{self.requantize}' is not one of fixed, float32")
        if self.float_precision == "bf16" and self.weight_only_fallback:
            raise QCompilerError("QuantConfig: weight_only_fallback keeps weak layers' weights quantized with float "
                                 "activations; float_precision 'bf16' runs them in bf16: choose one")
        try:
            self.scheme().check_scheme()
        except QCompilerError as e:
            raise QCompilerError(f"QuantConfig: {e}") from None

    def scheme(self, exclude: tuple[str, ...] = (), int8_weights: tuple[str, ...] = (),
               bf16: tuple[str, ...] = (), dynamic: tuple[str, ...] = ()) -> QuantScheme:
        """The options of insert-qdq and bias-correction this config stands for; ``exclude``:
        more layers kept float (weight-only with ``weight_only_fallback``), ``int8_weights``:
        layers of an i4 config kept at int8 weights (the sensitivity check's), ``bf16``: those of
        ``exclude`` that run in bfloat16, ``dynamic``: linears and matmuls with per-token scales
        (every linear and matmul under ``per_token="all"``)."""
        kept, weight_only = ((), tuple(exclude)) if self.weight_only_fallback else (tuple(exclude), ())
        return QuantScheme(self.per_channel, self.activation_dtype, self.op_types, self.exclude + kept,
                           self.max_abs_range, self.weight_dtype, self.weight_group_size, tuple(int8_weights),
                           weight_only, tuple(bf16), ("*",) if self.per_token == "all" else tuple(dynamic))

    def sensitivity_floor(self, precision: str, op: str) -> tuple[float, str]:
        """The sensitivity check's floor for a layer of ``op`` kept out of int8 in ``precision``
        (the resolved float precision), and the field that set it; ``min_layer_sqnr_db`` must be
        set. Only linears rise to ``bf16_min_layer_sqnr_db``: every linear of 16 rows or more has
        a bf16 kernel; depthwise convolutions, convolutions with few channels and attention
        matmuls do not, and bf16 would cost them float32's time."""
        assert self.min_layer_sqnr_db is not None
        raised = self.bf16_min_layer_sqnr_db
        if precision == "bf16" and traits_of(op).config_type == "linear" and raised is not None \
                and raised > self.min_layer_sqnr_db:
            return raised, "bf16_min_layer_sqnr_db"
        return self.min_layer_sqnr_db, "min_layer_sqnr_db"

    def resolved(self, precision: str, has_attention: bool) -> tuple["QuantConfig", dict[str, str]]:
        """This config with ``per_token="auto"`` and ``smooth_quant=None`` decided, given the
        resolved float precision and whether the graph has attention; and, per field decided,
        what and why (the report's ``defaults``)."""
        per_token, smooth, why = self.per_token, self.smooth_quant, {}
        if per_token == "auto":
            per_token = "off" if precision == "bf16" else "all" if has_attention else "fallback"
            why["per_token"] = f"{per_token}: " + (
                "layers out of int8 run bf16" if precision == "bf16" else
                "attention (a matmul of two run-time tensors) and no native bf16" if has_attention else
                "layers out of int8 would run fp32")
        if smooth is None:
            smooth = per_token == "all" and has_attention
            why["smooth_quant"] = ("on: per-token scales on a graph with attention" if smooth else
                                   "off: " + ("no attention" if not has_attention else f"per_token is '{per_token}'"))
        return dataclasses.replace(self, per_token=per_token, smooth_quant=smooth), why

    def per_token_fallback(self, precision: str) -> bool:
        """Whether the sensitivity check tries per-token scales on a weak linear, given the
        resolved float precision (``per_token``)."""
        return self.per_token == "fallback" or (self.per_token == "auto" and precision == "fp32")

    def lower_stage(self) -> str:
        """lower-integer with this config's requantization form."""
        return "lower-integer" if self.requantize == "float32" else f"lower-integer{{requantize={self.requantize}}}"

    def resolved_float_precision(self, bf16_native: bool) -> str:
        """"bf16" or "fp32": ``float_precision`` with "auto" decided by whether the build's CPU
        computes bf16 natively (weight-only fallback keeps float32 activations)."""
        if self.float_precision != "auto":
            return self.float_precision
        return "bf16" if bf16_native and not self.weight_only_fallback else "fp32"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any], where: str = "QuantConfig") -> "QuantConfig":
        fields = {f.name for f in dataclasses.fields(QuantConfig)}
        unknown = set(data) - fields
        if unknown:
            raise QCompilerError(f"{where}: unknown keys {sorted(unknown)} (known: {', '.join(sorted(fields))})")
        data = dict(data)
        if "calibration" in data:
            cal = data["calibration"]
            cal_fields = {f.name for f in dataclasses.fields(CalibrationConfig)}
            if not isinstance(cal, dict) or set(cal) - cal_fields:
                raise QCompilerError(f"{where}: 'calibration' takes keys {', '.join(sorted(cal_fields))}")
            data["calibration"] = CalibrationConfig(**cal)
        if isinstance(data.get("low_rank"), dict):
            low_rank_fields = {f.name for f in dataclasses.fields(LowRank)}
            if set(data["low_rank"]) - low_rank_fields:
                raise QCompilerError(f"{where}: 'low_rank' takes keys {', '.join(sorted(low_rank_fields))}")
            data["low_rank"] = LowRank(**data["low_rank"])
        try:
            return QuantConfig(**data)
        except TypeError as e:
            raise QCompilerError(f"{where}: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @staticmethod
    def load(path: str | os.PathLike) -> "QuantConfig":
        """Read a JSON (or, with PyYAML installed, YAML) config file."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise QCompilerError(f"{path}: cannot read config ({e.strerror})") from None
        except UnicodeDecodeError:
            raise QCompilerError(f"{path}: not a text file (a config is JSON or YAML)") from None
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except ImportError:
            raise QCompilerError(f"{path}: YAML configs need PyYAML (pip install pyyaml); or use JSON") from None
        except Exception as e:
            kind = "YAML" if path.suffix in (".yaml", ".yml") else "JSON"
            raise QCompilerError(f"{path}: not valid {kind}: "
                                 f"{(str(e).splitlines() or [''])[0]}") from None
        if not isinstance(data, dict):
            raise QCompilerError(f"{path}: a config is a JSON object")
        return QuantConfig.from_dict(data, where=str(path))

"""``qcompiler.compile``: model in, a callable compiled model out, with a report and a
deployment artifact (``save``/``load``).

The artifact is a folder: the compiled library (TVM ``export_library``), the IR that was
compiled (``graph.qir`` + ``graph.npz``), ``manifest.json`` (inputs, outputs, target, pipeline,
QuantConfig, quantization parameters, versions, sha256 of every file) and ``report.json``.
How it is written and checked (atomically, never over a user's folder) is ``artifact``'s job."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import artifact
from .artifact import FORMAT_VERSION
from .cpu_features import x86_without_vnni
from .errors import InputError, ModelLoadError, QCompilerError
from .extras import require
from .interpreter import check_inputs, to_numpy
from .ir import Graph, load_graph, parse_graph, save as save_graph
from .ir.ops import traits_of
from .ir.ops.tensor import wrapped_indices
from .ir.text import NpzWeights
from .progress import PhaseLog
from .quant_config import QuantConfig
from .rpc import RPC

TARGETS = ("llvm", "cuda", "reference", "onnx")
DEFAULT_TUNING_TRIALS = 256  # measured candidates over all of a model's tuned kernels
LIBRARY = "model.so"
ONNX_FILE = "model.onnx"
VOLATILE_REPORT_KEYS = ("compile_seconds", "build_seconds", "pass_timings_ms")


def versions() -> dict[str, str]:
    """What built an artifact, read from the installed packages' metadata (importing torch and
    TVM only to ask would cost a CLI command two seconds)."""
    from importlib import metadata

    from . import __version__

    return {"qcompiler": __version__, "tvm": metadata.version("apache-tvm"), "torch": metadata.version("torch"),
            "onnx": metadata.version("onnx"), "numpy": np.__version__}


def host_index_checks(graph: Graph) -> list[tuple[int, str, int]]:
    """(input position, node, axis size) for each graph input that an index op reads as indices."""
    position = {id(v): i for i, v in enumerate(graph.inputs)}
    checks = []
    for node in graph.nodes:
        if traits_of(node.op).family != "index":
            continue
        data = node.inputs[0]
        if node.op == "index":
            pairs = list(zip(node.inputs[1:], data.shape))
        else:
            pairs = [(node.inputs[1], data.shape[node.attrs["axis"] % data.type.rank])]
        checks += [(position[id(v)], node.describe(), size) for v, size in pairs if id(v) in position]
    return checks


def refuse_non_finite(graph: Graph, arrays: list[np.ndarray]) -> None:
    """Integer arithmetic has no NaN or inf: quantized, they become ordinary-looking numbers where
    the float model gives NaN. Refuse them instead (a sum first: one pass, no temporary)."""
    for value, a in zip(graph.inputs, arrays):
        if a.dtype.kind == "f" and a.size and not np.isfinite(a.sum(dtype=np.float64)) and not np.isfinite(a).all():
            what = "NaN" if np.isnan(a).any() else "inf"
            raise InputError(f"input %{value.name} contains {what}: a quantized model computes in integers, "
                             f"which have no {what} (the float model's output would be NaN or inf)")


def quantization_parameters(graph: Graph) -> dict[str, dict[str, Any]]:
    """Per-tensor scale and zero point of every quantized value (what requantize/quantize produce)."""
    from .compare import _integer_params

    by_id = {id(v): v for n in graph.nodes for v in n.outputs}
    return {by_id[i].name: {"scale": float(s), "zero_point": int(z), "dtype": by_id[i].dtype}
            for i, (s, z) in _integer_params(graph).items() if i in by_id}


def model_size_bytes(graph: Graph) -> int:
    """Bytes of the graph's constants as stored (4-bit weights packed)."""
    return sum(graph.constant_nbytes(name) for name in graph.constants)


class CompiledModel:
    """Callable on numpy arrays or torch tensors; returns one array, or a list for several outputs."""

    def __init__(self, graph: Graph, target: str, pipeline: str, runner: Any, report: dict[str, Any],
                 config: QuantConfig | None, executable: Any = None):
        self.graph = graph
        self.target = target
        self.pipeline = pipeline
        self.config = config
        self._runner = runner
        self._report = report
        self._executable = executable
        self._library: bytes | None = None  # a loaded artifact's library, saved again as it is
        self.digest: str | None = None  # the artifact's digest, once saved or loaded
        self._quantized = any(n.op == "quantize" for n in graph.nodes)
        # how images were normalized for calibration (`compile --image-mean/--image-std`); `run` applies it
        self.preprocessing: dict[str, Any] = {}
        self.calibration: Any = None  # the CalibrationRecord of a calibrated build (see save_ranges)
        # a CUDA kernel cannot stop a call on a bad index (it clamps): inputs used as indices are checked here
        self._host_index_checks = host_index_checks(graph) if target == "cuda" else []

    def __call__(self, *inputs: Any) -> Any:
        arrays = check_inputs(self.graph, [to_numpy(x) for x in inputs])
        if self._quantized:
            refuse_non_finite(self.graph, arrays)
        for position, node, size in self._host_index_checks:
            try:
                wrapped_indices(arrays[position], size)
            except InputError as e:
                raise InputError(f"{node}: {e}") from None
        outputs = self._runner(arrays)
        return outputs[0] if len(outputs) == 1 else outputs

    def report(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._report))

    def save_ranges(self, path: str | os.PathLike) -> Path:
        """Write what calibration decided (ranges, corrected biases, layers kept float) to
        ``path``; ``compile(..., ranges=path)`` builds the same model again without the data."""
        if self.calibration is None:
            raise QCompilerError("save_ranges: this build was not calibrated by qcompiler's quantization flow "
                                 "(no calibration data, a custom pipeline, or a loaded artifact)")
        return self.calibration.save(path)

    @property
    def runs_here(self) -> bool:
        """False for a build this machine cannot run (CUDA without a GPU, another CPU's instructions)."""
        return not hasattr(self._runner, "unavailable")

    def profile(self, *inputs: Any, repeat: int = 5) -> list[dict[str, Any]]:
        """Each kernel of a CPU build timed alone on the arguments it gets when run on
        ``inputs``: ``{"kernel", "calls", "ms"}`` per kernel, longest first."""
        if self.target != "llvm" or self._executable is None:
            raise QCompilerError(f"profile() needs a build for the llvm target, this one is '{self.target}'")
        from .targets.tvm.profile import kernel_times

        arrays = check_inputs(self.graph, [to_numpy(x) for x in inputs])
        return [{"kernel": k.name, "calls": k.calls, "ms": k.ms} for k in kernel_times(self._executable, arrays, repeat)]

    def latencies(self, *inputs: Any, iterations: int = 100, warmup: int = 10
                  ) -> tuple[list[float], list[np.ndarray]]:
        """Seconds of each of ``iterations`` calls on ``inputs`` (after ``warmup`` calls) and the
        outputs. A TVM build times the model alone, its inputs already on the device (TVM's time
        evaluator); the other targets time the Python call."""
        arrays = check_inputs(self.graph, [to_numpy(x) for x in inputs])
        if hasattr(self._runner, "latencies"):
            return self._runner.latencies(arrays, iterations, warmup)
        for _ in range(warmup):
            self._runner(arrays)
        seconds = []
        for _ in range(iterations):
            start = time.perf_counter()
            outputs = self._runner(arrays)
            seconds.append(time.perf_counter() - start)
        return seconds, list(outputs)

    def annotate(self, entries: dict[str, Any]) -> None:
        """Add results measured after compiling (accuracy on eval data, gate outcome) to the report."""
        self._report.update(entries)

    # ---- the artifact -------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        """What the manifest says besides its file list (``artifact.write`` adds that)."""
        return {
            "format_version": FORMAT_VERSION,
            "inputs": [{"name": v.name, "shape": list(v.shape), "dtype": v.dtype} for v in self.graph.inputs],
            "outputs": [{"name": v.name, "shape": list(v.shape), "dtype": v.dtype} for v in self.graph.outputs],
            "target": self.target,
            "target_spec": self._report.get("target_spec", self.target),
            "pipeline": self.pipeline,
            "quant_config": self.config.to_dict() if self.config else None,
            "quantization_parameters": quantization_parameters(self.graph),
            "versions": versions(),
            **({"preprocessing": self.preprocessing} if self.preprocessing else {}),
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the artifact (see ``qcompiler.artifact``: atomic, never over a folder that is not
        an artifact); its digest is ``self.digest`` afterwards."""
        def fill(staging: Path) -> dict[str, Any]:
            self._write_builds(staging)
            # timings vary run to run; the artifact keeps only what the same inputs reproduce
            stable = {k: v for k, v in self._report.items() if k not in VOLATILE_REPORT_KEYS}
            (staging / "report.json").write_text(json.dumps(stable, indent=2, sort_keys=True))
            return self.manifest()

        self.digest = artifact.write(directory, fill)
        return Path(directory)

    def _write_builds(self, staging: Path) -> None:
        self._write_build(staging, "")

    def _write_build(self, staging: Path, tag: str) -> None:
        """The IR and the library into ``staging``, their names marked with ``tag`` (a batch
        bucket's ``.bN``; empty for the model's own)."""
        save_graph(self.graph, staging / f"graph{tag}.qir")
        library = staging / LIBRARY.replace(".so", f"{tag}.so")
        if self.target == "onnx":
            (staging / ONNX_FILE).write_bytes(self._executable)
        elif self._library is not None:  # a loaded artifact: the library it was loaded from
            library.write_bytes(self._library)
        elif self._executable is not None:
            from .targets.tvm import export

            export(self._executable, library)


class BucketedModel(CompiledModel):
    """A model compiled for dynamic shapes (``qcompiler.batching``): one build per bucket; a
    call runs on the smallest bucket holding its batch and sequence, padded, and returns its own
    samples' and positions' outputs. ``graph`` and the rest are the first bucket's; the report
    is the calibrated bucket's, with ``report()["dynamic"]``."""

    def __init__(self, dims: Any, builds: dict[tuple[int, ...], CompiledModel], report: dict[str, Any]):
        from .batching import grid

        first = builds[grid(dims)[0]]
        super().__init__(first.graph, first.target, first.pipeline, first._runner, report, first.config,
                         first._executable)
        self._library = first._library
        self.calibration, self.preprocessing = first.calibration, first.preprocessing
        self.dims, self.builds = dims, builds

    def _bucket(self, arrays: list[np.ndarray]) -> tuple[CompiledModel, list[np.ndarray], tuple, tuple]:
        from .batching import resized, sizes_of

        names = [v.name for v in self.graph.inputs]
        if len(arrays) != len(names):
            raise InputError(f"the model takes {len(names)} input(s), got {len(arrays)}")
        sizes = sizes_of(self.dims, arrays, names)
        key = tuple(d.bucket_for(n) for d, n in zip(self.dims, sizes))
        return self.builds[key], resized(arrays, self.dims, key), key, sizes

    def run_arrays(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """The outputs for ``arrays`` (any shape in range), cut to the call's own samples and positions."""
        from .batching import cut

        build, padded, key, sizes = self._bucket(arrays)
        outputs = build(*padded)
        return cut(self.dims, key, sizes, outputs if isinstance(outputs, list) else [outputs])

    def __call__(self, *inputs: Any) -> Any:
        outputs = self.run_arrays([to_numpy(x) for x in inputs])
        return outputs[0] if len(outputs) == 1 else outputs

    def latencies(self, *inputs: Any, iterations: int = 100, warmup: int = 10
                  ) -> tuple[list[float], list[np.ndarray]]:
        build, padded, _, _ = self._bucket([to_numpy(x) for x in inputs])
        return build.latencies(*padded, iterations=iterations, warmup=warmup)

    def profile(self, *inputs: Any, repeat: int = 5) -> list[dict[str, Any]]:
        build, padded, _, _ = self._bucket([to_numpy(x) for x in inputs])
        return build.profile(*padded, repeat=repeat)

    def manifest(self) -> dict[str, Any]:
        return {**super().manifest(), "dynamic": [d.to_dict() for d in self.dims]}

    def _write_builds(self, staging: Path) -> None:
        from .batching import tag

        for key, build in self.builds.items():
            build._write_build(staging, tag(self.dims, key))


def load(directory: str | os.PathLike, expect_digest: str | None = None) -> CompiledModel:
    """Load an artifact written by ``CompiledModel.save`` (no original model or data needed).

    Loading a TVM artifact runs its native code: load only artifacts you trust. Every file is
    checked against the manifest; ``expect_digest`` (what ``save``/``qcompiler compile`` printed)
    pins the artifact itself, so a folder whose files were swapped together with their
    checksums is refused before any of its code is loaded."""
    directory = Path(directory)
    manifest, files, digest, graph, report = read_artifact(directory, expect_digest)
    model = _loaded_build(directory, manifest, files, graph, report, LIBRARY)
    declared = manifest.get("dynamic") or ([manifest["batch"]] if manifest.get("batch") else [])  # older: batch only
    if declared:
        from .batching import DimRange, grid, tag

        try:
            dims = tuple(DimRange.from_dict(d) for d in declared)
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"{directory}: malformed 'dynamic' in the manifest") from None
        builds = {}
        for key in grid(dims):
            mark = tag(dims, key)
            builds[key] = model if not mark else _loaded_build(
                directory, manifest, files, _graph_of(directory, files, f"graph{mark}"), report, f"model{mark}.so")
        model = BucketedModel(dims, builds, report)
    model.digest = digest
    model.preprocessing = dict(manifest.get("preprocessing") or {})
    return model


def _loaded_build(directory: Path, manifest: dict[str, Any], files: dict[str, bytes], graph: Graph,
                  report: dict[str, Any], library_name: str) -> CompiledModel:
    """One build of an artifact (its IR and, for TVM targets, ``library_name``), ready to run."""
    target = manifest["target"]
    config = QuantConfig.from_dict(manifest["quant_config"]) if manifest.get("quant_config") else None
    library = None
    if target == "reference":
        runner, executable = _reference_runner(graph), None
    elif target == "onnx":
        if ONNX_FILE not in files:
            raise ModelLoadError(f"{directory}: the manifest lists no {ONNX_FILE} for target onnx")
        executable = files[ONNX_FILE]
        runner = _onnxruntime_runner(executable, graph)
    elif target in ("llvm", "cuda"):
        from .targets.tvm import TVMRunner, device_for
        from .targets.tvm.build import missing_cpu_features

        if library_name not in files:
            raise ModelLoadError(f"{directory}: the manifest lists no {library_name} for target {target}")
        missing = missing_cpu_features(report["target_spec"]) if "target_spec" in report else []
        if missing:
            raise ModelLoadError(f"{directory}: built for a CPU with {', '.join(missing)}, which this machine (or "
                                 f"this process) lacks: compile the model again here")
        library = files[library_name]
        executable = _load_library(library, directory / library_name)
        runner = TVMRunner(executable, device_for(target), len(graph.outputs))
    else:
        raise ModelLoadError(f"{directory}: unknown target {target!r} in the manifest")
    model = CompiledModel(graph, target, manifest["pipeline"], runner, report, config, executable)
    model._library = library
    return model


def _graph_of(directory: Path, files: dict[str, bytes], stem: str) -> Graph:
    """The IR ``stem.qir`` (+ ``stem.npz``) of a checked artifact."""
    if f"{stem}.qir" not in files:
        raise ModelLoadError(f"{directory}: the manifest lists no {stem}.qir")
    weights = NpzWeights(io.BytesIO(files[f"{stem}.npz"])) if f"{stem}.npz" in files else {}
    try:
        text = files[f"{stem}.qir"].decode()
    except UnicodeDecodeError:
        raise ModelLoadError(f"{directory / (stem + '.qir')}: not IR text") from None
    return parse_graph(text, weights, filename=str(directory / f"{stem}.qir"))


def read_artifact(directory: Path, expect_digest: str | None = None
                  ) -> tuple[dict[str, Any], dict[str, bytes], str, Graph, dict[str, Any]]:
    """An artifact's checked files, digest, IR and report, without loading its native code (which
    may be for another machine: ``qcompiler bench`` runs it on a remote one)."""
    manifest, files, digest = artifact.read_checked(directory, expect_digest)
    graph = _graph_of(directory, files, "graph")
    try:
        report = json.loads(files["report.json"]) if "report.json" in files else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelLoadError(f"{directory / 'report.json'}: corrupt report") from None
    return manifest, files, digest, graph, report


def _load_library(data: bytes, where: Path) -> Any:
    """Load the checked library bytes from a private copy: what was checked is what runs, even
    if the artifact folder changes meanwhile."""
    from .targets.tvm import load as load_library

    with tempfile.TemporaryDirectory(prefix="qcompiler-load-") as private:
        path = Path(private) / LIBRARY
        path.write_bytes(data)
        try:
            return load_library(path)
        except QCompilerError as e:
            raise ModelLoadError(str(e).replace(str(path), str(where))) from None


ORT_INDEX_ERRORS = ("out of range", "out of data bounds", "invalid index")  # how ONNX Runtime reports bad indices


def _onnxruntime_runner(model_bytes: bytes, graph: Graph):
    require("onnxruntime", "running an onnx-target model")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures are raised below with their reason, not also logged
    if x86_without_vnni():
        # ONNX Runtime's fused u8 x s8 kernels use vpmaddubsw here, whose 16-bit pair sums saturate:
        # 18 output steps off on the digits CNN. Basic optimizations keep its exact kernels (within 1 step).
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    names = [v.name for v in graph.inputs]

    def run(arrays):
        try:
            return session.run(None, dict(zip(names, arrays)))
        except Exception as e:  # noqa: BLE001  ONNX Runtime's own check of the data (index bounds)
            text = str(e)
            if any(sign in text.lower() for sign in ORT_INDEX_ERRORS):
                reason = re.sub(r"^\S+\.cc:\d+ .*?\] ", "", text.split("Status Message: ")[-1].strip())
                raise InputError(f"ONNX Runtime: {reason}") from None
            raise
    return run


def _reference_runner(graph: Graph):
    from .interpreter import run

    return lambda arrays: run(graph, arrays)


# ---- compile -------------------------------------------------------------------------------------
def _prepared(model: Any, example_inputs: Any, calibration: Any, ranges: Any, pipeline: Any) -> Any:
    """``model`` when it is a ``qcompiler.qat.prepare`` result (checked against the other
    arguments), else None."""
    if type(model).__name__ != "QATModel" or not hasattr(model, "trained_qdq_graph"):
        return None
    if calibration is not None or ranges is not None or pipeline is not None:
        raise QCompilerError("a model prepared for quantization-aware training carries its learned ranges: compile "
                             "it without calibration, ranges or pipeline")
    if example_inputs is not None:
        shapes = [tuple(np.shape(to_numpy(x))) for x in example_inputs]
        expected = [v.shape for v in model.captured.inputs]
        if shapes != expected:
            raise QCompilerError(f"the prepared model was captured at input shapes {expected}; compile it with "
                                 f"example inputs of those shapes, got {shapes}")
    return model


def _capture(model: Any, example_inputs: Any, input_shapes: dict[str, Sequence[Any]] | None = None) -> Graph:
    from .capture import from_onnx

    is_onnx = (isinstance(model, (str, os.PathLike)) and not str(model).endswith((".qir", ".txt", ".mlir"))) \
        or type(model).__name__ == "ModelProto"
    if input_shapes is not None and not is_onnx:
        raise QCompilerError("input_shapes applies to ONNX models (a torch module takes its shapes from "
                             "example_inputs, and dynamic_shapes)")
    if isinstance(model, Graph):
        return model
    if isinstance(model, (str, os.PathLike)) or type(model).__name__ == "ModelProto":
        if not is_onnx:
            return load_graph(model)
        return from_onnx(model, input_shapes)
    import torch

    from .capture import from_torch

    if isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise QCompilerError("compiling a torch module needs example_inputs (the shapes it runs at)")
        return from_torch(model, example_inputs)
    raise QCompilerError(f"cannot compile a {type(model).__name__}: pass a torch.nn.Module, an ONNX file or "
                         f"ModelProto, or a qcompiler Graph")


def _dynamic_dims(model: Any, example_inputs: Any, dynamic_shapes: Any, input_shapes: Any,
                  batch_buckets: Sequence[int] | None, sequence_buckets: Sequence[int] | None) -> Any:
    """The declared dynamic dimensions (``batching.Dims``): empty for a static build."""
    from . import batching

    if dynamic_shapes is not None:
        if type(model).__name__ == "QATModel" or not hasattr(model, "forward") or example_inputs is None:
            raise QCompilerError("dynamic_shapes applies to a torch module with example_inputs (for an ONNX file "
                                 "give input_shapes with (min, max) dimensions)")
        return batching.from_dynamic_shapes(dynamic_shapes, model, list(example_inputs), batch_buckets,
                                            sequence_buckets)
    if input_shapes is not None:
        from .capture.from_onnx import input_names

        return batching.from_input_shapes(input_shapes, input_names(model), batch_buckets, sequence_buckets)
    if batch_buckets is not None or sequence_buckets is not None:
        raise QCompilerError("batch_buckets / sequence_buckets apply to a dynamic dimension (dynamic_shapes, or a "
                             "(min, max) in input_shapes)")
    return ()


def _compile_buckets(dims: Any, model: Any, example_inputs: Any, input_shapes: Any, **options: Any) -> CompiledModel:
    """One build per bucket of ``dims`` (see ``qcompiler.batching``): one calibrated (or from
    ``ranges``) at the smallest batch and the longest sequence, the others from its calibration
    record; then the per-sample and padding checks."""
    from . import batching
    from .calibration import CalibrationSet
    from .capture import from_onnx
    from .pass_manager import Instruments, run_pipeline
    from .quantize import float_stages

    started = time.perf_counter()
    examples = [to_numpy(x) for x in example_inputs] if example_inputs is not None else None
    phases = options["log"] if isinstance(options["log"], PhaseLog) else PhaseLog(options["log"])
    options["log"] = phases

    def capture_at(key: tuple[int, ...]) -> Graph:
        if examples is not None:
            import torch

            return _capture(model, [torch.from_numpy(np.ascontiguousarray(x))
                                    for x in batching.resized(examples, dims, key, cycle_batch=True)])
        return from_onnx(model, batching.shapes_at(input_shapes, dims, key))

    def float_graph_of(key: tuple[int, ...]) -> Graph:
        """The bucket's float graph as its build will see it: smoothed as the record says."""
        config = dataclasses.replace(options["config"] or QuantConfig(), smooth_quant=smoothing is not None)
        return run_pipeline(graphs[key].copy(), float_stages(config, None, smoothing), Instruments(emit=lambda s: None))

    keys = batching.grid(dims)
    calibrated = batching.calibrated_key(dims)
    keys.remove(calibrated)
    calibration, ranges = options.pop("calibration"), options.pop("ranges")
    graphs = {calibrated: capture_at(calibrated)}
    if calibration is not None and any(not d.is_batch for d in dims):
        calibration = CalibrationSet(graphs[calibrated], calibration, pad=batching.sequence_padder(dims))
    phases.phase("bucket", f"{_bucket_label(dims, calibrated)} (calibrated), then {len(keys)} more")
    builds = {calibrated: compile(graphs[calibrated], calibration=calibration, ranges=ranges, **options)}
    record = builds[calibrated].calibration
    if record is None and (calibration is not None or ranges is not None) and keys:
        raise QCompilerError("dynamic shapes: the calibrated build kept no calibration record to replay on the "
                             "other buckets")
    smoothing = str(record.save(Path(tempfile.mkdtemp(prefix="qcompiler-bucket-")) / "ranges.json")) \
        if record is not None and record.smoothing else None
    calibrated_float = float_graph_of(calibrated) if record is not None and keys else None
    for key in keys:
        phases.phase("bucket", _bucket_label(dims, key))
        graphs[key] = capture_at(key)
        why = batching.same_model(graphs[calibrated], graphs[key])
        if why is not None:
            raise QCompilerError(f"dynamic shapes: the model captured at {_bucket_label(dims, key)} is not the one "
                                 f"at {_bucket_label(dims, calibrated)}: {why}")
        path = None
        if record is not None:
            path = batching.record_for(record, float_graph_of(key), _bucket_label(dims, key), calibrated_float)
        builds[key] = compile(graphs[key], ranges=path, **options)
    dims = _with_output_axes(dims, graphs)
    ordered = {key: builds[key] for key in batching.grid(dims)}
    report = builds[calibrated].report()
    probe_source = examples if examples is not None else (
        list(calibration_set_first(graphs[calibrated], calibration)) if calibration is not None else
        _synthetic_inputs(graphs[calibrated]))
    if options["target"] == "onnx":
        phases.phase("onnx", "one model with symbolic dims, checked against each size's export")
        ordered = _symbolic_onnx(dims, ordered, lambda key: batching.resized(list(probe_source), dims, key,
                                                                             cycle_batch=True))
        report["onnx_symbolic_dims"] = [d.name for d in dims]
    entries = [d.to_dict() for d in dims]
    if all(b.runs_here for b in ordered.values()):
        phases.phase("check", "padded buckets against unpadded runs (per sample, per position)")
        run = lambda key, arrays: _as_list(ordered[key](*arrays))  # noqa: E731
        for d, entry in zip(dims, entries):
            if d.is_batch:
                probe = batching.probe_inputs(probe_source, d.inputs, batching.PROBE_SAMPLES)
                entry["per_sample_exact"] = batching.check_per_sample(dims, run, probe)
            else:
                entry["padding_max_relative_error"] = batching.check_padding(dims, run, list(probe_source))
    report["dynamic"] = {"dims": entries, "calibrated_at": list(calibrated), "buckets": len(ordered),
                         "dispatch": "a call runs on the smallest bucket that holds it: a batch padded with copies of "
                                     "its last sample, a sequence with zeros; the padding's outputs are dropped"}
    report["compile_seconds"] = round(time.perf_counter() - started, 2)
    model_out = BucketedModel(dims, ordered, report)
    model_out.calibration = record
    return model_out


def _symbolic_onnx(dims: Any, builds: dict[tuple[int, ...], CompiledModel],
                   inputs_at: Callable[[tuple[int, ...]], list[np.ndarray]]) -> dict[tuple[int, ...], CompiledModel]:
    """The buckets' ONNX exports merged into one model whose dynamic dims are symbolic
    (``targets.onnx.symbolic``), checked against each export at its size; every bucket then runs
    it (the artifact's one ``model.onnx`` serves any size in range, in ONNX Runtime or elsewhere)."""
    from .targets.onnx.symbolic import check_merged, merge

    first = next(iter(builds.values()))
    inputs = [[(d.axis, d.name) for d in dims if i in d.inputs] for i in range(len(first.graph.inputs))]
    outputs = [[(0 if d.is_batch else d.outputs[j], d.name) for d in dims if d.is_batch or d.outputs[j] is not None]
               for j in range(len(first.graph.outputs))]
    sources = [(first.graph.inputs[d.inputs[0]].name, d.axis) for d in dims]
    models = {key: build._executable for key, build in builds.items()}
    merged = merge(models, inputs, outputs, sources)
    check_merged(merged, models, inputs_at,
                 lambda model, arrays: [np.asarray(o) for o in _onnxruntime_runner(model, first.graph)(arrays)])
    return {key: CompiledModel(b.graph, "onnx", b.pipeline, _onnxruntime_runner(merged, b.graph), b.report(), b.config,
                               merged) for key, b in builds.items()}


def _bucket_label(dims: Any, key: tuple[int, ...]) -> str:
    return ", ".join(f"{d.kind} {size}" for d, size in zip(dims, key))


def _with_output_axes(dims: Any, graphs: dict[tuple[int, ...], Graph]) -> Any:
    """The sequence's output axes, from the captures at its shortest and longest buckets."""
    from . import batching

    base = batching.grid(dims)[0]
    out = []
    for i, d in enumerate(dims):
        if not d.is_batch:
            long = base[:i] + (d.buckets[-1],) + base[i + 1:]
            d = dataclasses.replace(d, outputs=batching.output_axes(d, graphs[base], graphs[long],
                                                                    (base[i], long[i])))
        out.append(d)
    return tuple(out)


def calibration_set_first(graph: Graph, calibration: Any) -> list[np.ndarray]:
    from .calibration import calibration_set

    return calibration_set(graph, calibration).first()


def _synthetic_inputs(graph: Graph) -> list[np.ndarray]:
    """Standard-normal floats and zero integers of the graph's input shapes (the per-sample check
    of a float build without data)."""
    rng = np.random.default_rng(0)
    return [rng.standard_normal(v.shape).astype(v.type.np_dtype) if v.type.np_dtype.kind == "f"
            else np.zeros(v.shape, v.type.np_dtype) for v in graph.inputs]


def _as_list(outputs: Any) -> list[np.ndarray]:
    return list(outputs) if isinstance(outputs, list) else [outputs]


def _fidelity(reference: Graph, compiled: CompiledModel, batch: Sequence[np.ndarray]) -> dict[str, float]:
    from .compare import _metrics

    want = reference(*batch)[0]
    got = compiled(*batch)
    got = got[0] if isinstance(got, list) else got
    sqnr, cosine, max_abs = _metrics(want, got)
    return {"output_sqnr_db": round(sqnr, 3) if np.isfinite(sqnr) else None, "output_cosine": round(cosine, 6),
            "output_max_abs_error": float(max_abs)}


def _int8_kernels_report(tvm_target: Any, quantized: bool) -> dict[str, Any]:
    """Which hand-written int8 kernels the build uses, and a warning where it has none."""
    from .targets.tvm.build import int8_kernels

    kernels = int8_kernels(tvm_target)
    entry: dict[str, Any] = {"kernels": kernels}
    if quantized and kernels is None:
        entry["warning"] = ("this target has no int8 dot-product instruction qcompiler has kernels for "
                            "(x86 AVX-512 VNNI or AVX2, CUDA sm_61+): integer convolutions and linears run on "
                            "generic integer kernels, exact but much slower; the float build may be faster here")
    return entry


def compile(model: Any, example_inputs: Any = None, calibration: Any = None, target: str = "llvm",
            config: QuantConfig | None = None, pipeline: str | None = None, tune: bool = False,
            tuning_db: str | os.PathLike | None = None, tuning_trials: int = DEFAULT_TUNING_TRIALS,
            progress: bool = False, cpu: str | None = None,
            log: Callable[[str], None] | PhaseLog | None = None,
            ranges: str | os.PathLike | None = None, rpc: RPC | None = None, dynamic_shapes: Any = None,
            input_shapes: dict[str, Sequence[Any]] | None = None,
            batch_buckets: Sequence[int] | None = None,
            sequence_buckets: Sequence[int] | None = None) -> CompiledModel:
    """Capture, quantize (when ``calibration`` is given) and build ``model`` for ``target``
    (``llvm``: this CPU through TVM, or the CPU LLVM calls ``cpu``; ``cuda``; ``reference``: the
    interpreter). A build for another CPU runs here only if this one has every instruction set
    its kernels use; otherwise it is built, reported and saved, and runs where it is loaded.
    ``calibration``: batches as ``qcompiler.calibration`` takes them (a list, an iterable, a
    generator or a function returning one; never all held in memory). ``ranges``: instead of
    calibration data, a calibration record saved from an earlier build of the same model
    (``compiled.save_ranges(path)``): the same quantized model, without recalibrating. ``log`` receives one line
    per phase (capture, optimize, calibrate, quantize, build) with the time since the start.

    ``tune=True`` tunes the kernels the hand-written schedules do not cover with MetaSchedule
    (``tuning_trials`` measured candidates in all) into ``tuning_db`` (a directory; a temporary
    one when not given); ``tuning_db`` alone applies the records already there. With ``rpc``
    (:class:`qcompiler.RPC`: a tracker and a key) the candidates are built here and measured on
    the servers registered under the key, as many at once as there are: tune for the machines the
    build ships to (an ``llvm`` build for their ``cpu``, or ``cuda`` on GPU servers).

    Dynamic shapes (``qcompiler.batching``): ``dynamic_shapes={"x": {0: torch.export.Dim("batch",
    min=1, max=32)}}`` for a torch module, ``input_shapes={"x": [(1, 32), 3, 224, 224]}`` for an
    ONNX file (whose dims ``input_shapes`` also pins); a range in another dimension is a sequence
    (``{"ids": [1, (8, 128)], "mask": [1, (8, 128)]}``). The model is built at ``batch_buckets``
    (default: the range's ends and the powers of 4 between) times ``sequence_buckets`` (the
    powers of 2) and takes any shape in range."""
    from .pass_manager import Instruments, run_pipeline
    from .passes import DEFAULT_FLOAT_PIPELINE
    from .pipeline import PassContext
    from .quantize import quantize

    if target not in TARGETS:
        raise QCompilerError(f"unknown target '{target}' (one of {', '.join(TARGETS)})")
    if (tune or tuning_db is not None) and target not in ("llvm", "cuda"):
        raise QCompilerError(f"tuning applies to TVM targets (llvm, cuda), not '{target}'")
    if rpc is not None and not tune:
        raise QCompilerError("rpc measures tuning candidates: it applies with tune=True (--tune)")
    if tune and target == "cuda" and rpc is None:
        from .targets.tvm import device_for

        if not device_for("cuda").exist:
            raise QCompilerError("tuning for cuda measures candidates on a GPU and this machine has none: give "
                                 "rpc= (--rpc-tracker, --rpc-key) a tracker key whose servers have one")
    if cpu is not None and target != "llvm":
        raise QCompilerError(f"cpu applies to the llvm target, not '{target}'")
    if ranges is not None and pipeline is not None:
        raise QCompilerError("ranges applies to the default quantization flow; with a pipeline, write "
                             "apply-calibration{path=FILE} into it instead of range-analysis and bias-correction")
    if tune and tuning_trials < 1:
        raise QCompilerError(f"tuning_trials must be at least 1, got {tuning_trials}")
    if tune:
        require("tune", "tune=True (--tune)")
    if target == "onnx":
        require("onnxruntime", "the onnx target")
    dims = _dynamic_dims(model, example_inputs, dynamic_shapes, input_shapes, batch_buckets, sequence_buckets)
    if dims:
        if pipeline is not None or _prepared(model, example_inputs, calibration, ranges, None):
            raise QCompilerError("dynamic shapes apply to the default flow (with or without calibration): not to a "
                                 "pipeline or a QAT model")
        return _compile_buckets(dims, model, example_inputs, input_shapes, calibration=calibration, target=target,
                                config=config, tune=tune, tuning_db=tuning_db, tuning_trials=tuning_trials,
                                progress=progress, cpu=cpu, log=log, ranges=ranges, rpc=rpc)
    started = time.perf_counter()
    phases = log if isinstance(log, PhaseLog) else PhaseLog(log)
    phases.phase("capture")
    prepared = _prepared(model, example_inputs, calibration, ranges, pipeline)
    graph = prepared.captured if prepared is not None else _capture(model, example_inputs, input_shapes)
    report: dict[str, Any] = {"target": target, "size_bytes": {"float": model_size_bytes(graph)}}
    batches, record = None, None
    if calibration is not None:  # a prepared model was refused with calibration above
        from .calibration import calibration_set

        batches = calibration_set(graph, calibration)
    if prepared is not None:
        # trained with quantization in the loop: its weights and scales are the quantization
        config, reference = prepared.config, prepared.trained_qdq_graph()
        inst = Instruments(emit=lambda s: None, on_pass=phases.for_pass)
        lower = config.lower_stage()
        compiled_graph = reference if target == "onnx" else run_pipeline(reference.copy(), lower, inst)
        used = prepared.pipeline + ("" if target == "onnx" else f",{lower}")
        timings, report["passes"] = inst.records, {}
        report["qat"] = {"layers": len(prepared.weights), "learned_scales": len(prepared.scales)}
    elif pipeline is not None:
        from .quantize import with_config

        used = with_config(pipeline, config) if config is not None else pipeline
        inst = Instruments(emit=lambda s: None, on_pass=phases.for_pass)
        ctx = PassContext(calibration=batches, progress=progress)
        reference = graph.copy()
        compiled_graph = run_pipeline(graph.copy(), used, inst, ctx)
        report["passes"] = ctx.report
        timings = inst.records
    elif batches is not None or ranges is not None:
        config = config or QuantConfig()
        if target == "onnx" and config.per_token == "auto":  # ONNX runtimes run per-token codes as float ops
            config = dataclasses.replace(config, per_token="off")
        # ONNX has no integer-lowered ops: the ONNX target ships the QDQ graph
        result = quantize(graph, batches, config, progress=progress, lower=target != "onnx", on_pass=phases.for_pass,
                          ranges=ranges, bf16_native=_bf16_native(target, cpu))
        # the model as given is the reference: what float passes lose on purpose (low-rank) is the build's cost
        compiled_graph, reference, used, timings = result.graph, graph, result.pipeline, result.timings
        report["passes"] = result.report
        report["requantize"] = config.requantize
        record = result.calibration
    else:
        inst = Instruments(emit=lambda s: None, on_pass=phases.for_pass)
        used = DEFAULT_FLOAT_PIPELINE
        if any(n.op in ("quantize", "dequantize") for n in graph.nodes):  # a QDQ model (ONNX Runtime's, NNCF's):
            used = used.replace("fold-constants", "fold-constants{keep_quantized_weights=true}")  # int8 weights kept
            if target != "onnx":  # integer ops, then the weights they did not take folded to float
                used += f",{(config or QuantConfig()).lower_stage()},fold-constants"
        ctx = PassContext()
        compiled_graph = run_pipeline(graph.copy(), used, inst, ctx)
        reference, timings = graph, inst.records
        report["passes"] = ctx.report
    compiled_graph.name_outputs([v.name for v in graph.outputs])  # the model's interface, whatever rewrote them
    integer_ops = sum(1 for n in compiled_graph.nodes if traits_of(n.op).family == "integer")
    report["quantized"] = integer_ops > 0 or any(n.op == "quantize" for n in compiled_graph.nodes)
    if not report["quantized"]:
        report["note"] = ("float model: no calibration data was given" if batches is None else
                          "nothing was quantized: see passes.kept_float / not_quantized")
    report["kept_float"] = report["passes"].get("kept_float", [])
    for key in ("precision_search", "int8_weight_search", "float32_search", "float_precision", "int8_weights", "gptq",
                "low_rank", "cross_layer_equalization", "range_search", "per_token", "widen_float16", "defaults",
                "smooth_quant"):
        if key in report["passes"]:
            report[key] = report["passes"][key]
    report["ops"] = {"integer": integer_ops, "total": len(compiled_graph.nodes), "by_op": compiled_graph.op_counts()}
    report["size_bytes"]["compiled"] = model_size_bytes(compiled_graph)
    if compiled_graph.storage:
        report["int4_weights"] = len(compiled_graph.storage)
    report["pass_timings_ms"] = [{"pass": r.name, "ms": round(r.seconds * 1e3, 2), "changed": r.changed}
                                 for r in timings]
    report["pipeline"] = used
    executable, runnable = None, True
    phases.phase("build", target if cpu is None else f"{target} for {cpu}")
    if target == "reference":
        runner = _reference_runner(compiled_graph)
    elif target == "onnx":
        from .targets.onnx import to_onnx

        executable = to_onnx(compiled_graph).SerializeToString()
        runner = _onnxruntime_runner(executable, compiled_graph)
        if x86_without_vnni() and report["quantized"]:
            report["note_onnxruntime"] = ("this CPU has no VNNI: ONNX Runtime's fused int8 kernels saturate on it "
                                          "(u8 x s8 pairs summed in 16 bits), so qcompiler runs the model with basic "
                                          "graph optimizations; do the same where you deploy on such CPUs")
    else:
        from .targets.tvm import TVMRunner, build, device_for, make_target
        from .targets.tvm.build import missing_cpu_features

        tvm_target = make_target(target, arch=cpu)
        if tune and rpc is None and target == "llvm" and missing_cpu_features(str(tvm_target)):
            raise QCompilerError(f"tuning measures candidates where they run, and this machine lacks "
                                 f"{', '.join(missing_cpu_features(str(tvm_target)))} of CPU '{cpu}': tune "
                                 f"through rpc= (--rpc-tracker, --rpc-key) on machines of that CPU")
        report["target_spec"] = str(tvm_target)
        report["int8_kernels"] = _int8_kernels_report(tvm_target, report["quantized"])
        build_started = time.perf_counter()
        with contextlib.ExitStack() as stack:
            temporary = tune and tuning_db is None
            if temporary:
                tuning_db = stack.enter_context(tempfile.TemporaryDirectory(prefix="qcompiler-tuning-"))
            executable = build(compiled_graph, tvm_target, tuning_db=tuning_db, tune_trials=tuning_trials if tune else 0,
                               progress=progress, report=report, rpc=rpc)
            if temporary:
                report["tuning"]["database"] = None  # records used for this build only: pass tuning_db to keep them
        report["build_seconds"] = round(time.perf_counter() - build_started, 2)
        missing = missing_cpu_features(str(tvm_target)) if target == "llvm" else []
        runnable = (target == "llvm" and not missing) or (target == "cuda" and device_for(target).exist)
        if missing:
            report["note_runs_elsewhere"] = f"built for a CPU with {', '.join(missing)}, which this machine lacks"
        runner = TVMRunner(executable, device_for(target), len(compiled_graph.outputs)) if runnable \
            else _unavailable(f"this machine cannot run the build: {report['note_runs_elsewhere']}" if missing
                              else f"this machine has no device for target '{target}'")
    compiled = CompiledModel(compiled_graph, target, used, runner, report, config, executable)
    compiled.calibration = record
    if batches is not None and runnable:
        phases.phase("check", "output fidelity on the first calibration batch")
        report["fidelity"] = _fidelity(reference, compiled, batches.first())
    elif prepared is not None and runnable:
        phases.phase("check", "output fidelity against the prepared model on the example inputs")
        report["fidelity"] = _fidelity(reference, compiled, [to_numpy(x) for x in example_inputs])
    report["compile_seconds"] = round(time.perf_counter() - started, 2)
    phases.done()
    return compiled


def _bf16_native(target: str, cpu: str | None) -> bool:
    """The build computes bf16 natively (an llvm target with AMX-BF16): where
    ``float_precision="auto"`` puts the layers kept out of int8 in bf16."""
    if target != "llvm":
        return False
    from .targets.tvm import make_target
    from .targets.tvm.build import bf16_kernels

    return bf16_kernels(make_target(target, arch=cpu)) is not None


def _unavailable(reason: str):
    def runner(arrays):
        raise QCompilerError(f"{reason}: save() the model and load it where it can run")
    runner.unavailable = reason
    return runner

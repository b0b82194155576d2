"""``qcompiler.compile``: model in, a callable compiled model out, with a report and a
deployment artifact (``save``/``load``).

The artifact is a folder: the compiled library (TVM ``export_library``), the IR that was
compiled (``graph.qir`` + ``graph.npz``), ``manifest.json`` (inputs, outputs, target, pipeline,
QuantConfig, quantization parameters, versions, sha256 of every file) and ``report.json``.
It is written to a temporary folder beside the destination and renamed into place, so a
failed or interrupted save never replaces a good artifact."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelLoadError, QCompilerError
from .interpreter import check_inputs, to_numpy
from .ir import Graph, load_graph, save as save_graph
from .quant_config import QuantConfig

TARGETS = ("llvm", "cuda", "reference", "onnx")
DEFAULT_TUNING_TRIALS = 256  # measured candidates over all of a model's tuned kernels
FORMAT_VERSION = 1
LIBRARY = "model.so"
ONNX_FILE = "model.onnx"
VOLATILE_REPORT_KEYS = ("compile_seconds", "build_seconds", "pass_timings_ms")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    import onnx
    import torch
    import tvm

    from . import __version__

    return {"qcompiler": __version__, "tvm": tvm.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "numpy": np.__version__}


def quantization_parameters(graph: Graph) -> dict[str, dict[str, Any]]:
    """Per-tensor scale and zero point of every quantized value (what requantize/quantize produce)."""
    from .compare import _integer_params

    by_id = {id(v): v for n in graph.nodes for v in n.outputs}
    return {by_id[i].name: {"scale": float(s), "zero_point": int(z), "dtype": by_id[i].dtype}
            for i, (s, z) in _integer_params(graph).items() if i in by_id}


def model_size_bytes(graph: Graph) -> int:
    return int(sum(a.nbytes for a in graph.constants.values()))


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

    def __call__(self, *inputs: Any) -> Any:
        arrays = check_inputs(self.graph, [to_numpy(x) for x in inputs])
        outputs = self._runner(arrays)
        return outputs[0] if len(outputs) == 1 else outputs

    def report(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._report))

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

    def annotate(self, entries: dict[str, Any]) -> None:
        """Add results measured after compiling (accuracy on eval data, gate outcome) to the report."""
        self._report.update(entries)

    # ---- the artifact -------------------------------------------------------------------------
    def manifest(self, files: dict[str, str]) -> dict[str, Any]:
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
            "files": files,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        parent = directory.resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=parent))
        try:
            save_graph(self.graph, staging / "graph.qir")
            if self.target == "onnx":
                (staging / ONNX_FILE).write_bytes(self._executable)
            elif self._executable is not None:
                from .targets.tvm import export

                export(self._executable, staging / LIBRARY)
            # timings vary run to run; the artifact keeps only what the same inputs reproduce
            stable = {k: v for k, v in self._report.items() if k not in VOLATILE_REPORT_KEYS}
            (staging / "report.json").write_text(json.dumps(stable, indent=2, sort_keys=True))
            files = {p.name: _sha256(p) for p in sorted(staging.iterdir())}
            (staging / "manifest.json").write_text(json.dumps(self.manifest(files), indent=2, sort_keys=True))
            _replace_dir(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return directory


def _replace_dir(new: Path, dest: Path) -> None:
    """Move ``new`` to ``dest``; an existing ``dest`` is swapped out only once ``new`` is complete."""
    if dest.exists():
        if not (dest / "manifest.json").exists() and any(dest.iterdir()):
            raise QCompilerError(f"{dest}: exists and is not a qcompiler artifact; refusing to replace it")
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(new, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, dest)


def load(directory: str | os.PathLike) -> CompiledModel:
    """Load an artifact written by ``CompiledModel.save`` (no original model or data needed)."""
    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if not manifest_path.exists():
        raise ModelLoadError(f"{directory}: not a qcompiler artifact (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files, target = manifest["files"], manifest["target"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{manifest_path}: corrupt manifest ({type(e).__name__}: {e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(f"{manifest_path}: artifact format {manifest.get('format_version')} is not "
                             f"{FORMAT_VERSION}")
    for name, digest in files.items():
        path = directory / name
        if not path.exists():
            raise ModelLoadError(f"{path}: missing from the artifact")
        if _sha256(path) != digest:
            raise ModelLoadError(f"{path}: checksum mismatch (the file changed after the artifact was written)")
    graph = load_graph(directory / "graph.qir")
    report = json.loads((directory / "report.json").read_text()) if (directory / "report.json").exists() else {}
    config = QuantConfig.from_dict(manifest["quant_config"]) if manifest.get("quant_config") else None
    if target == "reference":
        runner, executable = _reference_runner(graph), None
    elif target == "onnx":
        if ONNX_FILE not in files:
            raise ModelLoadError(f"{directory}: the manifest lists no {ONNX_FILE} for target onnx")
        executable = (directory / ONNX_FILE).read_bytes()
        runner = _onnxruntime_runner(executable, graph)
    else:
        from .targets.tvm import TVMRunner, device_for
        from .targets.tvm import load as load_library
        from .targets.tvm.build import missing_cpu_features

        if LIBRARY not in files:
            raise ModelLoadError(f"{directory}: the manifest lists no {LIBRARY} for target {target}")
        missing = missing_cpu_features(report["target_spec"]) if "target_spec" in report else []
        if missing:
            raise ModelLoadError(f"{directory}: built for a CPU with {', '.join(missing)}, which this machine (or "
                                 f"this process) lacks: compile the model again here")
        executable = load_library(directory / LIBRARY)
        runner = TVMRunner(executable, device_for(target), len(graph.outputs))
    return CompiledModel(graph, target, manifest["pipeline"], runner, report, config, executable)


def _onnxruntime_runner(model_bytes: bytes, graph: Graph):
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    names = [v.name for v in graph.inputs]
    return lambda arrays: session.run(None, dict(zip(names, arrays)))


def _reference_runner(graph: Graph):
    from .interpreter import run

    return lambda arrays: run(graph, arrays)


# ---- compile -------------------------------------------------------------------------------------
def _capture(model: Any, example_inputs: Any) -> Graph:
    from .capture import from_onnx, from_torch

    if isinstance(model, Graph):
        return model
    if isinstance(model, (str, os.PathLike)) or type(model).__name__ == "ModelProto":
        if isinstance(model, (str, os.PathLike)) and str(model).endswith((".qir", ".txt", ".mlir")):
            return load_graph(model)
        return from_onnx(model)
    import torch

    if isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise QCompilerError("compiling a torch module needs example_inputs (the shapes it runs at)")
        return from_torch(model, example_inputs)
    raise QCompilerError(f"cannot compile a {type(model).__name__}: pass a torch.nn.Module, an ONNX file or "
                         f"ModelProto, or a qcompiler Graph")


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
                            "(x86 AVX-512 VNNI, CUDA sm_61+): integer convolutions and linears run on generic "
                            "integer kernels, exact but much slower (ResNet-18: about 18x); the float build "
                            "may be faster here")
    return entry


def compile(model: Any, example_inputs: Any = None, calibration: Any = None, target: str = "llvm",
            config: QuantConfig | None = None, pipeline: str | None = None, tune: bool = False,
            tuning_db: str | os.PathLike | None = None, tuning_trials: int = DEFAULT_TUNING_TRIALS,
            progress: bool = False, cpu: str | None = None) -> CompiledModel:
    """Capture, quantize (when ``calibration`` is given) and build ``model`` for ``target``
    (``llvm``: this CPU through TVM, or the CPU LLVM calls ``cpu``; ``cuda``; ``reference``: the
    interpreter). A build for another CPU runs here only if this one has every instruction set
    its kernels use; otherwise it is built, reported and saved, and runs where it is loaded.

    ``tune=True`` tunes the kernels the hand-written schedules do not cover with MetaSchedule
    (``tuning_trials`` measured candidates in all) into ``tuning_db`` (a directory; a temporary
    one when not given); ``tuning_db`` alone applies the records already there."""
    from .pass_manager import Instruments, run_pipeline
    from .passes import DEFAULT_FLOAT_PIPELINE
    from .pipeline import PassContext
    from .quantize import quantize

    if target not in TARGETS:
        raise QCompilerError(f"unknown target '{target}' (one of {', '.join(TARGETS)})")
    if (tune or tuning_db is not None) and target not in ("llvm", "cuda"):
        raise QCompilerError(f"tuning applies to TVM targets (llvm, cuda), not '{target}'")
    if tune and target == "cuda":
        raise QCompilerError("tuning for cuda is not supported yet: tune on the CPU target, or build cuda untuned")
    if cpu is not None and target != "llvm":
        raise QCompilerError(f"cpu applies to the llvm target, not '{target}'")
    if tune and tuning_trials < 1:
        raise QCompilerError(f"tuning_trials must be at least 1, got {tuning_trials}")
    started = time.perf_counter()
    graph = _capture(model, example_inputs)
    report: dict[str, Any] = {"target": target, "size_bytes": {"float": model_size_bytes(graph)}}
    batches = None
    if calibration is not None:
        from .passes.range_analysis import calibration_batches

        batches = calibration_batches(graph, calibration)
    if pipeline is not None:
        inst = Instruments(emit=lambda s: None)
        ctx = PassContext(calibration=batches, config=config, progress=progress)
        reference = graph.copy()
        compiled_graph = run_pipeline(graph.copy(), pipeline, inst, ctx)
        report["passes"] = ctx.report
        timings = inst.records
        used = pipeline
    elif batches is not None:
        config = config or QuantConfig()
        # ONNX has no integer-lowered ops: the ONNX target ships the QDQ graph
        result = quantize(graph, batches, config, progress=progress, lower=target != "onnx")
        compiled_graph, reference, used, timings = result.graph, result.float_graph, result.pipeline, result.timings
        report["passes"] = result.report
    else:
        inst = Instruments(emit=lambda s: None)
        compiled_graph = run_pipeline(graph.copy(), DEFAULT_FLOAT_PIPELINE, inst)
        reference, used, timings = graph, DEFAULT_FLOAT_PIPELINE, inst.records
        report["passes"] = {}
    integer_ops = sum(1 for n in compiled_graph.nodes if n.op.endswith("_int") or n.op in ("requantize", "add_int"))
    report["quantized"] = integer_ops > 0 or any(n.op == "quantize" for n in compiled_graph.nodes)
    if not report["quantized"]:
        report["note"] = ("float model: no calibration data was given" if batches is None else
                          "nothing was quantized: see passes.kept_float / not_quantized")
    report["kept_float"] = report["passes"].get("kept_float", [])
    report["ops"] = {"integer": integer_ops, "total": len(compiled_graph.nodes), "by_op": compiled_graph.op_counts()}
    report["size_bytes"]["compiled"] = model_size_bytes(compiled_graph)
    report["pass_timings_ms"] = [{"pass": r.name, "ms": round(r.seconds * 1e3, 2), "changed": r.changed}
                                 for r in timings]
    report["pipeline"] = used
    executable, runnable = None, True
    if target == "reference":
        runner = _reference_runner(compiled_graph)
    elif target == "onnx":
        from .targets.onnx import to_onnx

        executable = to_onnx(compiled_graph).SerializeToString()
        runner = _onnxruntime_runner(executable, compiled_graph)
    else:
        from .targets.tvm import TVMRunner, build, device_for, make_target
        from .targets.tvm.build import missing_cpu_features

        tvm_target = make_target(target, arch=cpu)
        report["target_spec"] = str(tvm_target)
        report["int8_kernels"] = _int8_kernels_report(tvm_target, report["quantized"])
        build_started = time.perf_counter()
        with contextlib.ExitStack() as stack:
            temporary = tune and tuning_db is None
            if temporary:
                tuning_db = stack.enter_context(tempfile.TemporaryDirectory(prefix="qcompiler-tuning-"))
            executable = build(compiled_graph, tvm_target, tuning_db=tuning_db, tune_trials=tuning_trials if tune else 0,
                               progress=progress, report=report)
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
    if batches is not None and runnable:
        report["fidelity"] = _fidelity(reference, compiled, batches[0])
    report["compile_seconds"] = round(time.perf_counter() - started, 2)
    return compiled


def _unavailable(reason: str):
    def runner(arrays):
        raise QCompilerError(f"{reason}: save() the model and load it where it can run")
    runner.unavailable = reason
    return runner

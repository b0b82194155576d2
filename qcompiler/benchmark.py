"""``qcompiler bench``: how fast an artifact runs, here or on a device behind an RPC tracker.

What is timed: for a TVM artifact (llvm, cuda), the model alone, its inputs already on the
device (TVM's time evaluator, one call per iteration: what a server that keeps its inputs on the
device sees); for the reference and onnx targets, the Python call. Every run is also checked: its
outputs against the reference interpreter's on the same inputs (the artifact carries its IR), so a
remote device that computes something else is caught, not timed. A local llvm artifact also gets
a per-kernel profile (``targets/tvm/profile.py``); the Relax VM's per-call instrument runs in the
process that owns the VM, which over RPC is the server, so a remote run has none and says so."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import QCompilerError
from .ir import Graph
from .rpc import RPC


@dataclass
class Benchmark:
    target: str
    where: str | dict[str, str]
    batch: int | None
    timed: str
    seconds: list[float]  # one per iteration
    max_abs_diff: dict[str, float]  # per output, against the reference interpreter
    profile: list[dict[str, Any]] | None
    profile_note: str | None

    def latency_ms(self) -> dict[str, float]:
        ms = np.asarray(self.seconds) * 1e3
        return {"min": float(ms.min()), "median": float(np.median(ms)), "p90": float(np.percentile(ms, 90)),
                "mean": float(ms.mean())}

    def to_dict(self) -> dict[str, Any]:
        latency = self.latency_ms()
        per_second = 1e3 / latency["median"]
        return {"target": self.target, "where": self.where, "timed": self.timed, "iterations": len(self.seconds),
                "batch": self.batch, "latency_ms": latency,
                "throughput": {"calls_per_s": per_second,
                               "samples_per_s": per_second * self.batch if self.batch else None},
                "max_abs_diff_vs_reference": self.max_abs_diff, "profile": self.profile,
                "profile_note": self.profile_note}


def bench(directory: str | os.PathLike, inputs: list[np.ndarray] | Callable[[Graph], list[np.ndarray]],
          iterations: int = 100, warmup: int = 10, rpc: RPC | None = None,
          expect_digest: str | None = None) -> Benchmark:
    """Time the artifact in ``directory`` on ``inputs`` (one array per model input, or a function
    of the artifact's graph giving them): here, or on a server of ``rpc``. The artifact is read
    and checked once."""
    from .compiled import LIBRARY, load, read_artifact
    from .interpreter import check_inputs

    if iterations < 1:
        raise QCompilerError(f"iterations must be at least 1, got {iterations}")
    directory = Path(directory)
    if rpc is None:
        model = load(directory, expect_digest)
        target, graph = model.target, model.graph
    else:
        manifest, files, _, graph, _ = read_artifact(directory, expect_digest)
        target = manifest["target"]
    inputs = check_inputs(graph, inputs(graph) if callable(inputs) else inputs)
    expected = graph(*inputs)
    expected = expected if isinstance(expected, (list, tuple)) else [expected]
    batch = int(inputs[0].shape[0]) if inputs and inputs[0].ndim else None
    profile, note = None, None
    if rpc is not None:
        if target not in ("llvm", "cuda"):
            raise QCompilerError(f"{directory}: bench over RPC runs TVM artifacts (llvm, cuda); this one is "
                                 f"'{target}'")
        from .targets.tvm import remote

        seconds, outputs = remote.latencies(rpc, files[LIBRARY], target, inputs, iterations, warmup,
                                            len(graph.outputs))
        where: str | dict[str, str] = {"tracker": rpc.tracker, "key": rpc.key}
        timed = "the model on the remote device, inputs already there (TVM time evaluator)"
        note = "no per-kernel profile over RPC: the Relax VM's instrument runs in the server's process"
    else:
        where = "local"
        seconds, outputs = model.latencies(*inputs, iterations=iterations, warmup=warmup)
        timed = ("the model on the device, inputs already there (TVM time evaluator)" if target in ("llvm", "cuda")
                 else "the Python call, inputs from numpy (wall clock)")
        if target == "llvm":
            kernels = model.profile(*inputs)
            total = sum(k["ms"] for k in kernels) or 1.0
            profile = [{**k, "share": k["ms"] / total} for k in kernels]
        else:
            note = f"no per-kernel profile for target '{target}' (llvm builds have one)"
    diff = {v.name: float(np.max(np.abs(np.asarray(o, np.float64) - np.asarray(e, np.float64)), initial=0.0))
            for v, o, e in zip(graph.outputs, outputs, expected)}
    return Benchmark(target, where, batch, timed, seconds, diff, profile, note)


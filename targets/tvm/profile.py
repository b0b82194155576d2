"""Per-kernel time of a built CPU module: what ``bench/`` reports when it explains where time goes.

The Relax VM calls an instrument around every packed-function call; it records each kernel's
arguments on one run, and every kernel is then timed alone on them with TVM's time evaluator
(timing inside the callback would add more than the short kernels take). Each kernel's time is
the fastest of its repeats: on a shared machine the minimum is the stable statistic."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
from tvm import relax


@dataclass(frozen=True)
class KernelTime:
    name: str
    calls: int  # per run
    ms: float  # per run, all calls together


def kernel_times(executable: Any, inputs: Sequence[np.ndarray], repeat: int = 5) -> list[KernelTime]:
    """Kernels of ``executable`` (a CPU build) by time per run, longest first."""
    device = tvm.cpu()
    vm = relax.VirtualMachine(executable, device)
    args = [tvm.runtime.tensor(np.require(a, requirements="C"), device) for a in inputs]
    module = executable.mod if hasattr(executable, "mod") else executable
    module = next((m for m in module.imports if m.kind in ("llvm", "library")), module)  # the kernels (built / loaded)
    calls: list[tuple[str, list]] = []

    def instrument(func, name: str, before: bool, result, *call_args) -> int:
        # the VM's own calls (vm.builtin.*, runtime.TVMTensorCreateView for views) are not kernels
        if before and module.implements_function(name):
            calls.append((name, [tvm.runtime.tensor(a.numpy(), device) if isinstance(a, tvm.runtime.Tensor) else a
                                 for a in call_args]))
        return 0  # VMInstrumentReturnKind.NO_OP

    vm.set_instrument(instrument)
    vm["main"](*args)
    totals: dict[str, list[float]] = {}
    for name, call_args in calls:
        timer = module.time_evaluator(name, device, number=3, repeat=repeat)
        totals.setdefault(name, []).append(float(np.min(timer(*call_args).results)) * 1e3)
    return sorted((KernelTime(name, len(ms), sum(ms)) for name, ms in totals.items()), key=lambda k: -k.ms)


def latencies(vm: Any, device: Any, args: Sequence[Any], iterations: int, warmup: int,
              num_outputs: int) -> tuple[list[float], list[np.ndarray]]:
    """Seconds of each of ``iterations`` calls of ``vm``'s ``main`` (after ``warmup`` calls), and
    its outputs. The stateful calls (inputs set once, on the device) work the same on a VM here and
    on one across RPC, and time the model, not the copies of its inputs."""
    vm.set_input("main", *args)
    for _ in range(max(warmup, 1)):
        vm.invoke_stateful("main")
    result = vm.get_outputs("main")
    outputs = [result.numpy()] if num_outputs == 1 else [result[i].numpy() for i in range(num_outputs)]
    timer = vm.time_evaluator("invoke_stateful", device, number=1, repeat=iterations)
    return [float(s) for s in timer("main").results], outputs

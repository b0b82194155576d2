"""Building Relax modules for the CPU (LLVM, the host's own CPU) and CUDA, running them, and
exporting/loading them as shared libraries.

TVM facts this relies on (../shared/DESIGN.md): targets take the JSON-dict form; plain
"llvm" is generic x86-64, so the host CPU is named explicitly; CUDA modules build without a
GPU (the module keeps CUDA source until it is loaded on one)."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.target import Target

from qcompiler.errors import QCompilerError
from qcompiler.ir import Graph
from qcompiler.rpc import RPC

from .index_check import raise_input_error
from .relax_lower import to_relax


def host_cpu() -> str:
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


def make_target(kind: str, arch: str | None = None, num_cores: int | None = None) -> Target:
    """``llvm`` for this machine's CPU, or ``cuda`` (``arch`` like ``sm_80``; default: the
    visible GPU's, else sm_80)."""
    if kind == "llvm":
        from tvm.target import codegen

        if arch is not None and not codegen.llvm_is_valid_cpu(arch, codegen.llvm_get_system_triple()):
            raise QCompilerError(f"unknown CPU '{arch}' for LLVM (for example znver4, icelake-server, "
                                 f"sapphirerapids, haswell)")
        spec: dict[str, Any] = {"kind": "llvm", "mcpu": arch or host_cpu()}
        if arch is None:  # AMX as this process may use it (the CPU name may not say, or say wrongly)
            from .x86_amx import host_attributes

            spec["mattr"] = host_attributes()
        spec["num-cores"] = num_cores or os.cpu_count() or 1
        return Target(spec)
    if kind == "cuda":
        if arch is None:
            dev = tvm.cuda(0)
            arch = f"sm_{dev.compute_version.replace('.', '')}" if dev.exist else "sm_80"
        # the host side is launch glue: built for any x86-64, so a GPU server whose CPU is older
        # than the build machine's runs it (a fleet's GPU racks are rarely the build machine)
        host = {"kind": "llvm", "mcpu": "x86-64"}
        # limits every GPU since sm_30 has; MetaSchedule's CUDA rules need them spelled out
        return Target({"kind": "cuda", "arch": arch, "max_threads_per_block": 1024, "thread_warp_size": 32,
                       "max_shared_memory_per_block": 49152}, host=Target(host))
    raise QCompilerError(f"unknown TVM target '{kind}' (llvm or cuda)")


WIDE_JOIN = 8  # operands


@tvm.transform.module_pass(opt_level=0, name="qcompiler.KeepWideJoinsUnfused")
def _keep_wide_joins_unfused(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """A concatenation of more than ``WIDE_JOIN`` tensors (an unrolled recurrence's outputs) is
    marked opaque, so FuseOps does not pull every operand's elementwise tail into one function:
    that function grows with the sequence and its scheduling is quadratic in its size (minutes
    for a BiLSTM of 24 steps), while the join itself is a copy."""
    for gv, func in list(mod.functions.items()):
        if isinstance(func, tvm.tirx.PrimFunc) and gv.name_hint.startswith("concatenate") \
                and len(func.params) > WIDE_JOIN + 1:
            mod[gv] = func.with_attr("op_pattern", 8)  # kOpaque
    return mod


FUSE = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), _keep_wide_joins_unfused,
        relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]


def _schedule(target: Target) -> tvm.transform.Pass:
    """Default schedules for every function not scheduled already (by hand or from a tuning database)."""
    if target.kind.name == "cuda":
        from tvm.s_tir import dlight as dl

        return dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                                       dl.gpu.Fallback())
    from .cpu_schedule import parallelize_cpu

    return parallelize_cpu


def int8_kernels(target: Target) -> str | None:
    """The hand-scheduled int8 kernels ``target`` can run: x86 AMX (with VNNI and VBMI), VNNI
    (with VBMI or not), AVX2 (``vpmaddwd``), CUDA dp4a (sm_61+), or none."""
    from .cuda_int8 import supports_dp4a
    from .x86_amx import supports_amx
    from .x86_int8 import supports_avx2, supports_vbmi, supports_vnni

    if supports_amx(target):
        return "amx"
    if supports_vnni(target):
        return "vnni-vbmi" if supports_vbmi(target) else "vnni"
    if supports_avx2(target):
        return "avx2"
    return "dp4a" if supports_dp4a(target) else None


def bf16_kernels(target: Target) -> str | None:
    """The hand-scheduled bf16 kernels ``target`` can run: x86 AMX-BF16 (``tdpbf16ps``), or none
    (a bf16 layer then runs its rounded operands through the float32 kernels: same result)."""
    from .x86_amx import supports_amx_bf16

    return "amx" if target.kind.name == "llvm" and supports_amx_bf16(target) else None


def lower(graph: Graph, target: Target) -> tvm.IRModule:
    """The graph as a fused Relax module for ``target``, its hand-written kernels scheduled."""
    cpu = target.kind.name == "llvm"
    cores = int(target.attrs.get("num-cores", 1)) if cpu else 1
    mod = to_relax(graph, int8_kernels=int8_kernels(target), cpu_kernels=cpu, cores=cores,
                   bf16_kernels=bf16_kernels(target))
    with target:
        mod = tvm.transform.Sequential(FUSE)(mod)
    return _without_schedule_rule_hints(mod)


def _without_schedule_rule_hints(mod: tvm.IRModule) -> tvm.IRModule:
    """Drop the ``schedule_rule`` block hints TOPI leaves (``meta_schedule.pool_max``): no rule
    of that name exists for CPUs, and MetaSchedule warns about each. Done before tuning and
    before every build alike, so tuning records keep matching."""
    from tvm.s_tir import Schedule

    for gv, func in list(mod.functions.items()):
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        try:
            sch = Schedule(func)
            blocks = sch.get_child_blocks(sch.get_sblock("root"))
        except Exception:  # noqa: BLE001  no root block
            continue
        hinted = [b for b in blocks if "schedule_rule" in sch.get(b).annotations]
        for block in hinted:
            sch.unannotate(block, "schedule_rule")
        if hinted:
            mod[gv] = sch.mod["main"]
    return mod


def build(graph: Graph, target: Target, tuning_db: str | os.PathLike | None = None, tune_trials: int = 0,
          progress: bool = False, report: dict | None = None, rpc: RPC | None = None) -> "relax.VMExecutable":
    """Build ``graph``; with ``tune_trials`` > 0 first tune its remaining kernels into
    ``tuning_db`` (MetaSchedule; candidates measured on the servers of ``rpc`` when given), and
    with ``tuning_db`` apply the schedules recorded there. ``report`` (when given) receives what
    tuning did."""
    mod = lower(graph, target)
    if tuning_db is not None:
        from . import tuning

        database = tuning.open_database(tuning_db)
        summary = tuning.tune(mod, target, database, Path(tuning_db) / "logs", tune_trials, progress, rpc) \
            if tune_trials > 0 else {}
        scheduled_before = _scheduled(mod)
        mod, set_aside = tuning.apply_database(mod, target, database, tuning_db, decide=tune_trials > 0, rpc=rpc)
        if report is not None:
            report["tuning"] = {"database": str(tuning_db), "tasks_tuned": summary.get("tasks", 0),
                                "trials": summary.get("trials", 0), "failed": summary.get("failed", 0),
                                "measured_on": summary.get("measured_on"),
                                "kernels_from_database": len(_scheduled(mod) - scheduled_before),
                                "records_slower_than_default": set_aside}
    with target:
        mod = _schedule(target)(mod)
    try:
        return relax.build(mod, target=target)
    except Exception as e:
        raise QCompilerError(f"TVM build for {target.kind.name} failed: {type(e).__name__}: "
                             f"{(str(e).strip().splitlines() or [''])[-1]}") from e


def _scheduled(mod: tvm.IRModule) -> set[str]:
    return {gv.name_hint for gv, f in mod.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and f.attrs.get("tirx.is_scheduled", False)}


# instruction sets the hand-written CPU kernels use: a module built with one runs only where it exists
KERNEL_FEATURES = ("avx2", "avx512f", "avx512bw", "avx512vnni", "avx512vbmi", "amx-tile", "amx-int8")


def missing_cpu_features(target_spec: str) -> list[str]:
    """The instruction sets an LLVM module built for ``target_spec`` (a target's JSON) uses that
    this machine, or this process (AMX needs Linux's permission), lacks."""
    from tvm.target import codegen

    target = Target(json.loads(target_spec))
    if target.kind.name != "llvm":
        return []
    host = make_target("llvm")
    return [f for f in KERNEL_FEATURES
            if codegen.target_has_features(f, target) and not codegen.target_has_features(f, host)]


class TVMRunner:
    """A built module on a device, called like the graph: numpy in, numpy out.

    Safe to call from any number of threads: a Relax VM keeps per-call state (registers,
    allocators) and crashes when two threads share one, so each calling thread gets its own VM
    over the one shared executable (created on its first call, about 0.1 ms)."""

    def __init__(self, executable: Any, device: Any, num_outputs: int):
        if device.dlpack_device_type() == tvm.cpu().dlpack_device_type():
            from .x86_amx import amx_usable

            amx_usable()  # AMX kernels fault unless the process asked Linux for the tile state first
        self.executable = executable
        self.device = device
        self.num_outputs = num_outputs
        self._local = threading.local()
        self._creating = threading.Lock()  # quiet_native_stderr swaps the process's fd 2
        self._vm()  # fail here, not at the first call, when the module cannot be loaded on the device

    def _vm(self) -> Any:
        vm = getattr(self._local, "vm", None)
        if vm is None:
            with self._creating, quiet_native_stderr():
                vm = self._local.vm = relax.VirtualMachine(self.executable, self.device)
        return vm

    def __call__(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        args = [tvm.runtime.tensor(np.require(a, requirements="C"), self.device) for a in arrays]
        try:
            result = self._vm()["main"](*args)
        except Exception as e:  # noqa: BLE001  a check compiled into a kernel (index range) failed
            raise_input_error(e)
            raise
        if self.num_outputs == 1:
            return [result.numpy()]
        return [result[i].numpy() for i in range(self.num_outputs)]

    def latencies(self, arrays: Sequence[np.ndarray], iterations: int, warmup: int
                  ) -> tuple[list[float], list[np.ndarray]]:
        """Seconds per call of the model alone (inputs already on the device) and its outputs."""
        from .profile import latencies
        from .remote import to_device

        return latencies(self._vm(), self.device, to_device(list(arrays), self.device), iterations, warmup,
                         self.num_outputs)


def device_for(kind: str):
    return tvm.cpu() if kind == "llvm" else tvm.cuda(0)


@contextlib.contextmanager
def quiet_native_stderr():
    """Silence TVM's C++ log lines (``Warning: Scope Saving: ...``) that go straight to file
    descriptor 2; what was written is replayed if the block fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def export(executable: Any, path: str | os.PathLike) -> Path:
    """The shared library at ``path``; on x86-64 Linux it asks for the AMX tile state when loaded
    (``x86_amx.LIBRARY_CONSTRUCTOR``), so that it runs in a process that only has TVM."""
    from .x86_amx import LIBRARY_CONSTRUCTOR

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="qcompiler-export-") as work, quiet_native_stderr():
        addons = []
        if sys.platform.startswith("linux") and platform.machine() == "x86_64":
            addons.append(str(Path(work) / "request_amx.c"))
            Path(addons[0]).write_text(LIBRARY_CONSTRUCTOR)
        try:
            executable.export_library(str(path), addons=addons, workspace_dir=work)
        except OSError:
            raise
        except Exception as e:  # the compiler or linker failed: a full disk, a missing tool
            raise QCompilerError(f"{path}: exporting the compiled library failed: "
                                 f"{(str(e).strip().splitlines() or [''])[-1]}") from None
    return path


def load(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise QCompilerError(f"{path}: compiled library is missing")
    try:
        with quiet_native_stderr():
            return tvm.runtime.load_module(str(path))
    except Exception as e:
        raise QCompilerError(f"{path}: cannot load compiled library ({(str(e).strip().splitlines() or [''])[-1]})") \
            from None


def cuda_source(executable: Any) -> str:
    """The generated CUDA C of a CUDA build (kept in the module until it is loaded on a GPU)."""
    sources: list[str] = []

    def walk(module: Any) -> None:
        if module.kind == "cuda":
            sources.append(module.inspect_source())
        for child in module.imports:
            walk(child)

    walk(executable.mod if hasattr(executable, "mod") else executable)
    return "\n".join(sources)

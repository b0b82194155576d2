"""The TVM target: IR -> Relax -> LLVM (this CPU) or CUDA modules."""
import os

# TVM's CPU thread pool sizes itself by physical cores, which on a 2-vCPU machine is one:
# use every CPU the process may run on unless the user chose otherwise (read at first use)
os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                             else os.cpu_count() or 1))

from .build import (TVMRunner, build, cuda_source, device_for, export, host_cpu, load,  # noqa: E402
                    make_target)
from .relax_lower import supported_ops, to_relax  # noqa: E402

__all__ = ["TVMRunner", "build", "cuda_source", "device_for", "export", "host_cpu", "load", "make_target",
           "supported_ops", "to_relax"]

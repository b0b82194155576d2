"""The TVM target: IR -> Relax -> LLVM (this CPU) or CUDA modules."""
from .build import TVMRunner, build, cuda_source, device_for, export, host_cpu, load, make_target
from .relax_lower import supported_ops, to_relax

__all__ = ["TVMRunner", "build", "cuda_source", "device_for", "export", "host_cpu", "load", "make_target",
           "supported_ops", "to_relax"]

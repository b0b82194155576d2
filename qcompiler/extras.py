"""Optional dependencies: what each extra of the package brings, and a clear error naming the
extra to install when a feature that needs one is used without it (never an ImportError from
deep inside a build)."""
from __future__ import annotations

import importlib.util

from .errors import QCompilerError

EXTRAS = {
    "onnxruntime": ("onnxruntime",),  # the onnx target, make demo's peer
    "tune": ("psutil", "cloudpickle"),  # MetaSchedule's worker pools
    "bench": ("onnxruntime", "onnxscript"),
    "rpc": ("tornado",),  # TVM's RPC tracker (python -m tvm.exec.rpc_tracker); clients need only "tune"  # the peers: ONNX Runtime's quantizer on torch's ONNX export
}


def require(extra: str, feature: str) -> None:
    """Refuse ``feature`` in one line when the modules of ``extra`` are not installed."""
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise QCompilerError(f"{feature} needs {', '.join(missing)}, which the core install leaves out: "
                             f"pip install 'qcompiler[{extra}]'")


def installed(extra: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in EXTRAS[extra])

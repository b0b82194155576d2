"""Sessions on the devices behind TVM's RPC tracker (:class:`qcompiler.rpc.RPC`): how many servers a
key has, a session on a free one, a module uploaded there and timed on its device.

Every failure of the network or of a server becomes one line naming the tracker and the key: a
user who mistyped a port or forgot to start the servers is told so, not shown a socket traceback."""
from __future__ import annotations

import contextlib
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import rpc as tvm_rpc

from qcompiler.errors import QCompilerError
from qcompiler.rpc import RPC

PROBE_TIMEOUT_S = 10


def _last_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[-1]


def connect(address: RPC) -> Any:
    """A session with the tracker (not yet with a device). Probed first: TVM's client retries a
    refused connection for a minute, a user with a wrong port should hear at once."""
    try:
        socket.create_connection((address.host, address.port), timeout=PROBE_TIMEOUT_S).close()
        return tvm_rpc.connect_tracker(address.host, address.port)
    except Exception as e:  # noqa: BLE001  refused, unknown host, not a tracker
        raise QCompilerError(f"cannot reach the RPC tracker at {address.tracker} ({_last_line(e)}): start one with "
                             f"`python -m tvm.exec.rpc_tracker --port {address.port}`") from None


def servers(address: RPC, tracker: Any = None) -> list[str]:
    """``HOST:PORT`` of each server registered under ``address.key`` (asking ``tracker``, a
    session from :func:`connect`, or a new one); an error when there is none."""
    summary = (tracker or connect(address)).summary()
    found = [f"{info['addr'][0]}:{info['addr'][1]}" for info in summary.get("server_info", [])
             if info.get("key") == f"server:{address.key}"]
    if not found:
        keys = sorted({info.get("key", "").removeprefix("server:") for info in summary.get("server_info", [])})
        raise QCompilerError(f"no RPC server is registered under {address} (keys there: "
                             f"{', '.join(keys) or 'none'}): start one with `python -m tvm.exec.rpc_server "
                             f"--tracker {address.tracker} --key {address.key}`")
    return found


@contextlib.contextmanager
def session(address: RPC) -> Iterator[Any]:
    """A session on a free server of ``address.key`` (waits for one while all are busy; refused at
    once when none is registered), closed on exit."""
    tracker = connect(address)
    servers(address, tracker)
    try:
        remote = tracker.request(address.key, priority=address.priority,
                                 session_timeout=address.session_timeout_s)
    except Exception as e:  # noqa: BLE001
        raise QCompilerError(f"no session on a server of {address}: {_last_line(e)}") from None
    try:
        yield remote
    finally:
        del remote  # the server ends the session when the client's connection closes


def device(remote: Any, kind: str, address: RPC) -> Any:
    """The remote session's device of ``kind`` (``llvm``: its CPU, ``cuda``: its first GPU)."""
    dev = remote.cpu(0) if kind == "llvm" else remote.cuda(0)
    if kind != "llvm" and not dev.exist:
        raise QCompilerError(f"the server of {address} has no {kind.upper()} device: register GPU machines "
                             f"under their own key")
    return dev


def upload(remote: Any, library: Any, name: str) -> Any:
    """``library`` (an exported-library's bytes, or a built module to export) loaded on the server."""
    with tempfile.TemporaryDirectory(prefix="qcompiler-rpc-") as folder:
        path = Path(folder) / name
        if isinstance(library, bytes):
            path.write_bytes(library)
        else:
            library.export_library(str(path))
        remote.upload(str(path))
    return remote.load_module(name)


def to_device(arrays: list[np.ndarray], dev: Any) -> list[Any]:
    return [tvm.runtime.tensor(np.require(a, requirements="C"), dev) for a in arrays]


def latencies(address: RPC, library: bytes, kind: str, inputs: list[np.ndarray], iterations: int, warmup: int,
              num_outputs: int) -> tuple[list[float], list[np.ndarray]]:
    """An exported model library (an artifact's) run on a server of ``address``: seconds per call
    and the outputs, as :func:`profile.latencies`."""
    from tvm import relax

    from .profile import latencies as vm_latencies

    with session(address) as remote:
        dev = device(remote, kind, address)
        try:
            vm = relax.VirtualMachine(upload(remote, library, "model.so"), dev)
            return vm_latencies(vm, dev, to_device(inputs, dev), iterations, warmup, num_outputs)
        except QCompilerError:
            raise
        except Exception as e:  # noqa: BLE001  the server crashed or dropped the session
            raise QCompilerError(f"the model failed on the server of {address}: {_last_line(e)} (built for "
                                 f"instructions or a GPU it lacks? compile with --cpu NAME for its CPU)") from None

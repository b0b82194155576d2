"""Where to reach a fleet of devices: TVM's RPC tracker and the key its servers registered under.

Devices register with a tracker (``python -m tvm.exec.rpc_tracker``) under a key naming the kind
of device (``python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY``); a client asks the
tracker for a session on any free server of a key. qcompiler uses it to measure tuning candidates
on the machines a build ships to (``compile(..., tune=True, rpc=RPC(...))``) and to time an
artifact there (``qcompiler bench --rpc-tracker``). This module is the address only: the sessions
are the TVM target's business (``targets/tvm/remote.py``)."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import QCompilerError


@dataclass(frozen=True)
class RPC:
    """``tracker``: ``HOST:PORT`` of the tracker; ``key``: the servers' key (``--key`` of
    ``rpc_server``). ``session_timeout_s``: how long one session (one candidate's measurement,
    one benchmark) may hold a server before the server drops it."""

    tracker: str
    key: str
    session_timeout_s: float = 120.0
    priority: int = 1

    def __post_init__(self) -> None:
        host, _, port = self.tracker.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise QCompilerError(f"RPC tracker '{self.tracker}': expected HOST:PORT, for example 127.0.0.1:9190")
        if not self.key or any(c.isspace() for c in self.key):
            raise QCompilerError(f"RPC key {self.key!r}: expected the key the servers registered under "
                                 f"(rpc_server --key), without spaces")
        if self.session_timeout_s <= 0:
            raise QCompilerError(f"RPC session_timeout_s must be positive, got {self.session_timeout_s}")

    @property
    def host(self) -> str:
        return self.tracker.rpartition(":")[0]

    @property
    def port(self) -> int:
        return int(self.tracker.rpartition(":")[2])

    def __str__(self) -> str:
        return f"key '{self.key}' at tracker {self.tracker}"

"""One line per phase of a long job (capture, optimize, calibrate, quantize, build), stamped
with the time since the job began: what a CI log needs to show that a four-minute compile is
alive and where its time goes. Rich progress bars stay for terminals; these lines go wherever
the caller's ``emit`` sends them (the CLI: stderr, unless ``--quiet``)."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# the phase each pass belongs to; passes not listed are float optimizations
PASS_PHASES = {"range-analysis": "calibrate", "bias-correction": "calibrate", "smooth-quant": "calibrate",
               "gptq": "calibrate", "search-ranges": "calibrate", "insert-qdq": "quantize", "lower-integer": "quantize",
               "precision-search": "search precision"}


class Step:
    """A step of the flow that is not a pass (the precision search), announced like one."""

    def __init__(self, name: str, detail: str):
        self.name, self.detail = name, detail

    def __str__(self) -> str:
        return self.detail


class PhaseLog:
    def __init__(self, emit: Callable[[str], None] | None = None):
        self.emit = emit
        self.started = time.perf_counter()
        self.current: str | None = None

    def phase(self, name: str, detail: str = "") -> None:
        """Announce ``name`` (once: repeated calls for the phase already running say nothing)."""
        if self.emit is None or name == self.current:
            return
        self.current = name
        self.emit(f"[{time.perf_counter() - self.started:7.1f} s] {name}" + (f": {detail}" if detail else ""))

    def for_pass(self, p: Any) -> None:
        """The pass manager's hook: the phase of the pass about to run."""
        self.phase(PASS_PHASES.get(p.name, "optimize"), str(p) if p.name in PASS_PHASES else "")

    def done(self, what: str = "done") -> None:
        self.current = None
        self.phase(what)


@contextmanager
def progress_bar(label: str, total: int | None, enabled: bool) -> Iterator[Callable[[], None]]:
    """A transient rich bar on stderr (stdout may carry a report: --json), shown only on a
    terminal; yields the function that advances it by one."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    with Progress(transient=True, console=console, disable=not enabled or not console.is_terminal) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)

"""MetaSchedule tuning of the kernels the hand-written schedules do not cover, with a JSON
database that later builds reuse without tuning.

What is tuned: every fused TIR function of the model that is not one of the hand-scheduled
kernels (``x86_amx``, ``x86_int8``, ``cpu_float``, ...: those carry ``tirx.is_scheduled``) - layout
and elementwise chains, float islands, integer ops the VNNI kernels do not take. The database
(``tuning_db``, a directory holding MetaSchedule's ``database_workload.json`` and
``database_tuning_record.json``) is keyed by the structural hash of each fused function, so
it applies to any later build that fuses the same way; tasks already in it are not tuned again.

TVM facts this relies on (DESIGN.md): MetaSchedule's builder workers import TVM (slow here),
so the builder gets a generous timeout; without ``xgboost`` the search uses a random cost
model and samples schedules at random (every candidate is still measured on the machine)."""
from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import logging
import os
import sys
import types
from pathlib import Path
from typing import Any

import tvm
import tvm_ffi
from tvm.target import Target

from qcompiler.errors import QCompilerError
from qcompiler.rpc import RPC

BUILD_TIMEOUT_S = 180
RUN_TIMEOUT_S = 60
TRIALS_PER_ITERATION = 8


def open_database(path: str | os.PathLike) -> Any:
    """The JSON database in directory ``path`` (created if missing)."""
    from tvm.s_tir import meta_schedule as ms

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise QCompilerError(f"{path}: a tuning database is a directory (MetaSchedule's JSON files), not a file")
    path.mkdir(parents=True, exist_ok=True)
    try:
        return ms.database.JSONDatabase(work_dir=str(path), module_equality="structural")
    except Exception as e:  # noqa: BLE001  a corrupt or foreign file
        raise QCompilerError(f"{path}: cannot read the tuning database ({(str(e).strip().splitlines() or [''])[-1]})") \
            from None


def _hand_scheduled(task: Any) -> bool:
    func = next(iter(task.dispatched[0].functions.values()))
    return bool(func.attrs and func.attrs.get("tirx.is_scheduled", False))


def pending_tasks(mod: tvm.IRModule, target: Target, database: Any) -> list[Any]:
    """Fused TIR functions of ``mod`` that are neither hand-scheduled nor tuned in ``database``."""
    from tvm.s_tir import meta_schedule as ms

    tasks = ms.relax_integration.extract_tasks(mod, target)
    return [t for t in tasks if not _hand_scheduled(t)
            and database.query_tuning_record(t.dispatched[0], target, t.task_name) is None]


@contextlib.contextmanager
def _without_tensor_intrinsics():
    """``TuneContext`` imports ``tvm.s_tir.tensor_intrin`` to register every tensor intrinsic:
    hundreds of TVMScript functions, each parse walking ``sys.modules`` (a minute and more
    once torch is loaded), for rules the plain LLVM rule set never uses. A placeholder module
    stands in while the contexts are made; a real import later is unaffected."""
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        yield
        return
    sys.modules[name] = types.ModuleType(name)
    try:
        yield
    finally:
        del sys.modules[name]


def _builder_initializer() -> Any:
    """Run first in each of MetaSchedule's build workers: the placeholder of
    :func:`_without_tensor_intrinsics`. Its default build imports the tensor intrinsics in
    every worker of every round (the pool is restarted each round): a minute per round on this
    machine, for intrinsics the plain LLVM rules never use. Made inside a function so that it
    travels to the worker by value, without importing qcompiler there."""

    def stub() -> None:
        import sys
        import types

        sys.modules.setdefault("tvm.s_tir.tensor_intrin", types.ModuleType("tvm.s_tir.tensor_intrin"))

    return stub


@contextlib.contextmanager
def _quiet_meta_schedule():
    """MetaSchedule logs every round's table at INFO; keep its files, not the console noise.

    Its logger set-up lists the handlers already on its logger by name, and fails on one without
    a name (pytest's capture handlers end up there after a first tuning in a process): those are
    set aside while it tunes and put back after."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    level = logger.level
    unnamed = [h for h in logger.handlers if h.get_name() is None]
    for handler in unnamed:
        logger.removeHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
        for handler in unnamed:
            logger.addHandler(handler)


def tune(mod: tvm.IRModule, target: Target, database: Any, log_dir: str | os.PathLike, trials: int,
         progress: bool = False, rpc: RPC | None = None) -> dict[str, Any]:
    """Tune the pending tasks of ``mod`` (a fused Relax module) with ``trials`` measured
    candidates in all, recording into ``database`` (from :func:`open_database`); MetaSchedule's
    logs go to ``log_dir``. Candidates are built here and measured on this machine, or on the
    servers of ``rpc`` (as many at once as are registered)."""
    from tvm.s_tir import meta_schedule as ms

    tasks = pending_tasks(mod, target, database)
    runner, measured_on = _runner(rpc) if tasks and trials > 0 else (None, _place(rpc))
    summary: dict[str, Any] = {"tasks": len(tasks), "trials": 0, "measured_on": measured_on}
    if not tasks or trials <= 0:
        return summary
    if importlib.util.find_spec("xgboost") is not None:
        cost_model, strategy = "xgb", "evolutionary"
    else:  # a random cost model would only slow an evolutionary search: sample schedules directly
        cost_model, strategy = "random", "replay-trace"
    # the plain LLVM rules: the VNNI rule set would import tvm.s_tir.tensor_intrin (~30 s, and its
    # broken dot_16x4_vnni); the int8 products are the hand-written kernels' job
    rules = "cuda" if target.kind.name == "cuda" else "llvm"
    space = ms.space_generator.PostOrderApply(sch_rules=rules, postprocs=rules, mutator_probs=rules)
    with _quiet_meta_schedule(), _progress(progress, trials, len(tasks)) as counter:
        with _without_tensor_intrinsics():
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                tasks, str(log_dir), space=space, strategy=strategy)
        ms.tune.tune_tasks(
            tasks=contexts, task_weights=weights, work_dir=str(log_dir), max_trials_global=trials,
            num_trials_per_iter=TRIALS_PER_ITERATION, database=database, cost_model=cost_model,
            builder=ms.builder.LocalBuilder(timeout_sec=BUILD_TIMEOUT_S, initializer=_builder_initializer()),
            runner=runner, measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), counter])
    summary["trials"] = counter.count
    summary["failed"] = counter.failed
    if counter.count and counter.failed == counter.count:
        where = "this machine" if rpc is None else f"the servers of {rpc}"
        raise QCompilerError(f"tuning: none of the {counter.count} candidate(s) ran on {where}: {counter.first_error}")
    return summary


def _place(rpc: RPC | None) -> str | dict[str, Any]:
    return "local" if rpc is None else {"tracker": rpc.tracker, "key": rpc.key}


def _runner(rpc: RPC | None) -> tuple[Any, str | dict[str, Any]]:
    """MetaSchedule's runner: here, or on every server registered under the key (checked first,
    so that a wrong address fails in one line before any candidate is built)."""
    from tvm.s_tir import meta_schedule as ms

    if rpc is None:
        return ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S), "local"
    from . import remote

    hosts = remote.servers(rpc)
    config = ms.runner.RPCConfig(tracker_host=rpc.host, tracker_port=rpc.port, tracker_key=rpc.key,
                                 session_priority=rpc.priority, session_timeout_sec=int(rpc.session_timeout_s))
    return ms.runner.RPCRunner(config, max_workers=len(hosts)), {**_place(rpc), "servers": hosts}


@contextlib.contextmanager
def _progress(show: bool, trials: int, tasks: int):
    """A measure callback counting candidates, driving a progress bar when ``show``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    console = Console(stderr=True)  # stdout may carry a report (--json); bars only on a terminal
    bar = Progress(TextColumn(f"tuning {tasks} kernels"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   transient=True, console=console, disable=not show or not console.is_terminal)

    @derived_object
    class Counter(ms.measure_callback.PyMeasureCallback):
        def __init__(self) -> None:
            self.count = 0
            self.failed = 0  # candidates that did not build or run (a bad schedule, a lost server)
            self.first_error = ""
            self.task = bar.add_task("tune", total=trials)

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
            self.count += len(measure_candidates)
            for built, ran in zip(builder_results, runner_results):
                error = built.error_msg or ran.error_msg
                if error:
                    self.failed += 1
                    self.first_error = self.first_error or (error.strip().splitlines() or [""])[-1]
            bar.update(self.task, completed=min(self.count, trials))

    with bar:
        yield Counter()


DEFAULT_WINS = "qcompiler_default_wins.json"  # beside MetaSchedule's files in the database directory


def apply_database(mod: tvm.IRModule, target: Target, database: Any, directory: str | os.PathLike,
                   decide: bool = False, rpc: RPC | None = None) -> tuple[tvm.IRModule, int]:
    """``mod`` with the functions ``database`` holds a record for replaced by their best schedule
    (marked scheduled, so the default schedule leaves them alone), except those whose default
    schedule is at least as fast; and how many records were set aside for that.

    Which are is decided once, right after tuning (``decide``): on the CPU each kernel with a
    record not yet decided is timed against its default schedule (alone, on zero-filled
    arguments; here, or on a server of ``rpc`` when tuning measured there), and the outcome kept
    in ``directory``'s :data:`DEFAULT_WINS` file. MetaSchedule measures candidates in a worker
    process, and its best for a small fused kernel can lose to the default in a real run
    (ResNet-18 with AMX: 2.6 ms untuned, 3.2 ms with every record applied). Later builds read the
    file, so that a database gives the same build every time."""
    from tvm import relax

    from .cpu_schedule import default_schedule

    with target, database:
        tuned = relax.transform.MetaScheduleApplyDatabase()(mod)
    replaced = [(gv, mod[gv]) for gv, func in tuned.functions.items()
                if isinstance(func, tvm.tirx.PrimFunc) and gv in mod and not mod[gv].same_as(func)
                and not mod[gv].attrs.get("tirx.is_scheduled", False)]
    path = Path(directory) / DEFAULT_WINS
    decided = json.loads(path.read_text()) if path.exists() else {"default_wins": [], "record_wins": []}
    if decide and target.kind.name == "llvm":
        known = set(decided["default_wins"]) | set(decided["record_wins"])
        undecided = [(gv, before) for gv, before in replaced if str(tvm_ffi.structural_hash(before)) not in known]
        with _kernel_timer(target, rpc if undecided else None) as seconds:
            for gv, before in undecided:
                wins = seconds(default_schedule(before)) <= seconds(tuned[gv])
                decided["default_wins" if wins else "record_wins"].append(str(tvm_ffi.structural_hash(before)))
        path.write_text(json.dumps(decided, indent=1))
    default_wins = set(decided["default_wins"])
    set_aside = 0
    for gv, before in replaced:
        if str(tvm_ffi.structural_hash(before)) in default_wins:
            tuned[gv] = before
            set_aside += 1
    return tuned, set_aside


@contextlib.contextmanager
def _kernel_timer(target: Target, rpc: RPC | None):
    """A function giving the median time of a CPU kernel alone on zero-filled arguments (zeros:
    any index is in bounds), on this machine or on one server of ``rpc`` (one session for all)."""
    import numpy as np
    from tvm.s_tir import meta_schedule as ms

    from . import remote

    def timer(dev: Any, load: Any):
        def seconds(func: tvm.tirx.PrimFunc) -> float:
            executable = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
            args = [np.zeros([int(d) for d in info.shape], info.dtype)
                    for info in ms.arg_info.ArgInfo.from_prim_func(func)]
            evaluate = load(executable).time_evaluator("main", dev, number=5, repeat=7, min_repeat_ms=5)
            return float(np.median(evaluate(*remote.to_device(args, dev)).results))
        return seconds

    if rpc is None:
        yield timer(tvm.cpu(), lambda executable: executable.mod)
        return
    with remote.session(rpc) as session:
        names = itertools.count()
        yield timer(remote.device(session, "llvm", rpc),
                    lambda executable: remote.upload(session, executable, f"kernel{next(names)}.so"))

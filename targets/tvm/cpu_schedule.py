"""A default CPU schedule for every TIR function: parallelize each loop nest over its leading
data-parallel loops (fused into one, so a batch of 1 still spreads over the cores).

TVM's CPU build otherwise runs every kernel as serial loops. This is the first, generic rule;
op-specific schedules (register tiling, vectorized and VNNI inner loops, packed int8 layouts)
are still to come and will take precedence over it."""
from __future__ import annotations

import tvm
from tvm.s_tir import Schedule

DATA_PARALLEL = 0  # tirx IterVar.DataPar


def _parallelize(func: "tvm.tirx.PrimFunc") -> "tvm.tirx.PrimFunc":
    sch = Schedule(func)
    try:
        root = sch.get_sblock("root")
    except Exception:  # noqa: BLE001  no root block: nothing to schedule
        return func
    for block in sch.get_child_blocks(root):
        loops = sch.get_loops(block)
        iters = sch.get(block).iter_vars
        if not loops or len(loops) != len(iters):
            continue  # loops do not map one-to-one onto the block's iterators
        spatial = 0
        for it in iters:
            if int(it.iter_type) != DATA_PARALLEL:
                break
            spatial += 1
        if spatial == 0:
            continue
        outer = sch.fuse(*loops[:spatial]) if spatial > 1 else loops[0]
        sch.parallel(outer)
    return sch.mod["main"]


@tvm.transform.module_pass(opt_level=0, name="qcompiler.ParallelizeCPU")
def parallelize_cpu(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    updates = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc) and not func.attrs.get("tirx.is_scheduled", False):
            updates[gv] = _parallelize(func)
    for gv, func in updates.items():
        mod[gv] = func
    return mod

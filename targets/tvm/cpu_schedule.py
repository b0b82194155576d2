"""A default CPU schedule for every TIR function that TVM's CPU build would otherwise run as
serial loops:

- every loop nest runs in parallel over its leading data-parallel loops (fused into one, so a
  batch of 1 still spreads over the cores);
- a reduction (conv, dense, pooling) reduces around its innermost output axis, which is then
  vectorized: ``out[..., x:x+v] += a[..., x+r:x+r+v] * w[r]``.
If the vectorizing form does not apply to a function, it gets the parallel form alone.
Op-specific schedules (register tiling, packed int8 layouts, VNNI) are still to come."""
from __future__ import annotations

import tvm
from tvm.s_tir import Schedule

DATA_PARALLEL = 0  # tirx IterVar.DataPar
VECTOR_LANES = 16  # AVX-512: 16 x f32/i32; wider vectors only make LLVM slower


def _inline_elementwise(sch: Schedule) -> None:
    """Fold every elementwise block into its elementwise readers: a fused chain (a
    requantization is ~20 ops) then makes one pass over memory instead of one per op, and
    booleans never reach memory (TVM 0.27's vectorizer mixes i1 and i8 lanes when they do)."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if any(_is_reduction(sch, consumer) for consumer in sch.get_consumers(block)):
            continue  # a padded input stays materialized: inlined, its bounds checks would stop the vectors
        try:
            sch.compute_inline(block)
        except Exception:  # noqa: BLE001  a reduction, or a block writing the function's output
            pass


def _is_reduction(sch: Schedule, block) -> bool:
    return any(int(it.iter_type) != DATA_PARALLEL for it in sch.get(block).iter_vars)


def _schedule(func: "tvm.tirx.PrimFunc", vectorize: bool) -> "tvm.tirx.PrimFunc":
    sch = Schedule(func)
    _inline_elementwise(sch)
    root = sch.get_sblock("root")
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
        reductions = loops[spatial:]
        inner = loops[spatial - 1]
        extent = sch.get(inner).extent
        if vectorize and reductions and spatial >= 2 and isinstance(extent, tvm.tirx.IntImm) and extent.value >= 4:
            sch.reorder(*reductions, inner)
            if extent.value > VECTOR_LANES:  # vectors of 16 lanes; the rest of the axis loops around them
                strip, inner = sch.split(inner, [None, VECTOR_LANES])
                sch.reorder(strip, *reductions, inner)
            sch.vectorize(inner)
            outer = sch.fuse(*loops[:spatial - 1]) if spatial > 2 else loops[0]
        elif vectorize and not reductions and isinstance(extent, tvm.tirx.IntImm) and extent.value >= 4:
            # elementwise: vectors along the innermost axis, in strips of 16 lanes
            if extent.value > VECTOR_LANES:
                strip, inner = sch.split(inner, [None, VECTOR_LANES])
            sch.vectorize(inner)
            outer = sch.fuse(*loops[:spatial - 1]) if spatial > 2 else loops[0]
            if spatial == 1:
                outer = strip if extent.value > VECTOR_LANES else None
        else:
            outer = sch.fuse(*loops[:spatial]) if spatial > 1 else loops[0]
        if outer is not None:
            sch.parallel(outer)
    return sch.mod["main"]


def _parallelize(func: "tvm.tirx.PrimFunc") -> "tvm.tirx.PrimFunc":
    try:
        Schedule(func).get_sblock("root")
    except Exception:  # noqa: BLE001  no root block: nothing to schedule
        return func
    try:
        return _schedule(func, vectorize=True)
    except Exception:  # noqa: BLE001  a block the vectorizing form cannot take: parallel only
        return _schedule(func, vectorize=False)


@tvm.transform.module_pass(opt_level=0, name="qcompiler.ParallelizeCPU")
def parallelize_cpu(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    updates = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc) and not func.attrs.get("tirx.is_scheduled", False):
            updates[gv] = _parallelize(func)
    for gv, func in updates.items():
        mod[gv] = func
    return mod

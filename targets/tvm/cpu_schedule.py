"""The default CPU schedule for every TIR function the hand-written kernels (``x86_int8``,
``cpu_float``) do not cover: pooling, reductions, float islands, elementwise chains.

- elementwise chains fused by Relax are inlined into one loop nest (one pass over memory);
- every loop nest runs in parallel over its leading data-parallel loops (fused into one, so a
  batch of 1 still spreads over the cores), its innermost axis vectorized in strips;
- a reduction (pooling, mean, a conv the kernels do not take) reduces around its innermost
  output axis: ``out[..., x:x+v] += a[..., x+r:x+r+v] * w[r]``, the strip accumulated in a
  register, initialized and stored once.
Each function gets the first of these forms that applies: register accumulation, in-memory
accumulation, parallel loops alone."""
from __future__ import annotations

import tvm
from tvm.s_tir import Schedule

DATA_PARALLEL = 0  # tirx IterVar.DataPar
VECTOR_LANES = 16  # AVX-512: 16 x f32/i32; wider vectors only make LLVM slower


def _strip(extent: int) -> int:
    """Vector width for an axis: 16, or a divisor of the extent from 8 to 15 so that no strip
    needs a per-lane predicate (which scalarizes it); 16 with a tail otherwise."""
    if extent % VECTOR_LANES == 0:
        return VECTOR_LANES
    return next((w for w in range(VECTOR_LANES - 1, 7, -1) if extent % w == 0), VECTOR_LANES)


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


def _split_strip(sch: Schedule, loop, extent: int) -> tuple:
    """(strip loop or None, vector loop): the axis cut into vector strips when longer than one."""
    if extent <= VECTOR_LANES:
        return None, loop
    return tuple(sch.split(loop, [None, _strip(extent)]))


def _schedule(inlined: Schedule, vectorize: bool, in_registers: bool = False) -> "tvm.tirx.PrimFunc":
    sch = inlined.copy()
    root = sch.get_sblock("root")
    for block in sch.get_child_blocks(root):
        loops = sch.get_loops(block)
        iters = sch.get(block).iter_vars
        if not loops or len(loops) != len(iters):
            continue  # loops do not map one-to-one onto the block's iterators
        spatial = next((i for i, it in enumerate(iters) if int(it.iter_type) != DATA_PARALLEL), len(iters))
        if spatial == 0:
            continue
        reductions = loops[spatial:]
        inner = loops[spatial - 1]
        extent = sch.get(inner).extent
        vectorizable = vectorize and isinstance(extent, tvm.tirx.IntImm) and extent.value >= 4
        if vectorizable and reductions and spatial >= 2:
            sch.reorder(*reductions, inner)
            strip, inner = _split_strip(sch, inner, extent.value)
            if strip is not None:  # the rest of the axis loops around the reduction
                sch.reorder(strip, *reductions, inner)
            outer = sch.fuse(*loops[:spatial - 1]) if spatial > 2 else loops[0]
            if in_registers:  # accumulate the strip in a register, initialized once, stored once
                sch.parallel(outer)
                write_back = sch.cache_write(block, 0, "local")
                sch.reverse_compute_at(write_back, strip if strip is not None else outer)
                sch.vectorize(inner)
                sch.decompose_reduction(block, reductions[0])
                sch.vectorize(sch.get_loops(write_back)[-1])
                continue
            sch.vectorize(inner)
        elif vectorizable and not reductions:  # elementwise: vectors along the innermost axis
            strip, inner = _split_strip(sch, inner, extent.value)
            sch.vectorize(inner)
            outer = sch.fuse(*loops[:spatial - 1]) if spatial > 2 else loops[0] if spatial == 2 else strip
        else:
            outer = sch.fuse(*loops[:spatial]) if spatial > 1 else loops[0]
        if outer is not None:
            sch.parallel(outer)
    return sch.mod["main"]


def default_schedule(func: "tvm.tirx.PrimFunc") -> "tvm.tirx.PrimFunc":
    """``func`` as :func:`parallelize_cpu` schedules it."""
    try:
        inlined = Schedule(func)
        inlined.get_sblock("root")
    except Exception:  # noqa: BLE001  no root block: nothing to schedule
        return func
    _inline_elementwise(inlined)  # once: each form below starts from a copy (inlining is quadratic in blocks)
    for vectorize, in_registers in ((True, True), (True, False)):
        try:
            return _schedule(inlined, vectorize, in_registers)
        except Exception:  # noqa: BLE001  a block this form cannot take: try the simpler one
            pass
    return _schedule(inlined, vectorize=False)


@tvm.transform.module_pass(opt_level=0, name="qcompiler.ParallelizeCPU")
def parallelize_cpu(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    updates = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc) and not func.attrs.get("tirx.is_scheduled", False):
            updates[gv] = default_schedule(func)
    for gv, func in updates.items():
        mod[gv] = func
    return mod

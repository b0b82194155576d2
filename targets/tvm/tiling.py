"""Schedule pieces shared by the hand-written CPU kernels: a register tile of accumulators with
the epilogue applied on the tile, and the scheduled function marked opaque for Relax."""
from __future__ import annotations

import tvm

LANES = 16  # 32-bit lanes of an AVX-512 vector


def padded(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def accumulate_in_registers(sch, accumulate, tile_loop, unrolled) -> "tvm.s_tir.SBlockRV":
    """Accumulators in registers for one tile; the epilogue reads them there and stores once."""
    copy_out = sch.cache_write(accumulate, 0, "local")
    sch.compute_inline(copy_out)  # the epilogue reads the accumulators directly
    epilogue = sch.get_sblock("out")
    sch.reverse_compute_at(epilogue, tile_loop)
    for loop in unrolled:
        sch.unroll(loop)
    return epilogue


def finalize(sch, epilogue) -> tvm.tirx.PrimFunc:
    try:
        sch.vectorize(sch.get_loops(epilogue)[-1])
    except Exception:  # noqa: BLE001  a tail predicate the vectorizer cannot take: scalar stores
        pass
    return opaque(sch)


def opaque(sch) -> tvm.tirx.PrimFunc:
    """The scheduled function, named by the Relax module, never fused with its neighbours."""
    func = sch.mod["main"].without_attr("global_symbol")
    return func.with_attrs({"tirx.is_scheduled": True, "op_pattern": 8})  # 8: kOpaque


def pick(extent: int, choices: tuple[int, ...]) -> int:
    return next(c for c in choices if extent % c == 0)


MAX_ACCUMULATORS = 28  # of 32 vector registers: the rest hold the streamed operand and the broadcast


def row_tile(channels: int, strips: int) -> tuple[int, int]:
    """(output channels, 16-wide strips) per register tile of a convolution over output rows:
    the pair that divides both extents, fits the registers, and reuses loads best (each strip
    load feeds ``rows`` instructions, each broadcast weight ``strips`` of them)."""
    options = [(r, s) for r in range(1, MAX_ACCUMULATORS + 1) if channels % r == 0 for s in range(1, strips + 1)
               if strips % s == 0 and r * s <= MAX_ACCUMULATORS]
    return max(options, key=lambda rs: (rs[0] * rs[1] / (rs[0] + rs[1]), rs[1]))

"""Packed storage of int8 weight constants that carry only 4 bits of information per element.

An int4 weight with per-group scales is stored in the IR as the int8 array it computes with:
each element is ``q * m``, ``q`` in [-7, 7] (the 4-bit value) and ``m`` in [1, 18] one integer
per group of ``group_size`` consecutive elements of a row (a row is an output channel: axis 0,
the rest flattened). The group's scale is ``m`` times the row's scale, so ``|q * m| <= 126``
is exact in int8: the integer kernels, the interpreter and the reference compute the same
int32 sums, and only the storage is 4-bit. A constant declared with :class:`Int4Groups` is
written as two arrays (the nibbles, two per byte, and the multipliers, one byte per group) and
read back to the same int8 array."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Q_MAX = 7  # symmetric 4-bit values
M_MAX = 18  # largest group multiplier: 7 * 18 = 126 fits int8
NIBBLES, MULTIPLIERS = "#i4", "#i4m"  # the suffixes of a packed constant's two arrays in an .npz


@dataclass(frozen=True)
class Int4Groups:
    group_size: int

    def __str__(self) -> str:
        return f"i4/{self.group_size}"

    def _grouped(self, array: np.ndarray) -> np.ndarray:
        """``array`` as [rows, groups, group_size] int32, the last group padded with zeros."""
        rows = array.shape[0] if array.ndim else 1
        flat = array.reshape(rows, -1).astype(np.int32)
        groups = -(-flat.shape[1] // self.group_size)
        padded = np.zeros((rows, groups * self.group_size), np.int32)
        padded[:, :flat.shape[1]] = flat
        return padded.reshape(rows, groups, self.group_size)

    def multipliers(self, array: np.ndarray) -> np.ndarray | None:
        """Each group's multiplier (the largest that divides it into [-7, 7]), or None when some
        group has none: the array is not a 4-bit weight of this group size."""
        if array.dtype != np.int8 or array.ndim == 0:
            return None
        grouped = np.abs(self._grouped(array))
        common = np.gcd.reduce(grouped, axis=2)
        largest = grouped.max(axis=2)
        chosen = np.zeros(common.shape, np.int32)
        for m in range(1, M_MAX + 1):  # the last valid (largest) multiplier wins
            chosen = np.where((common % m == 0) & (largest <= Q_MAX * m), m, chosen)
        chosen = np.where(largest == 0, 1, chosen)
        return None if (chosen == 0).any() else chosen.astype(np.uint8)

    def pack(self, array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(nibbles, multipliers): ``q + 8`` two per byte (low nibble first) in row-major order,
        and one multiplier per [row, group]. Raises ValueError when ``array`` does not fit."""
        m = self.multipliers(array)
        if m is None:
            raise ValueError(f"not an int4 weight with groups of {self.group_size}: some group is not "
                             f"a multiple of one m <= {M_MAX} with values in [-{Q_MAX}, {Q_MAX}]")
        rows = array.shape[0]
        q = array.reshape(rows, -1).astype(np.int32)
        cols = q.shape[1]
        q = q // np.repeat(m.astype(np.int32), self.group_size, axis=1)[:, :cols]
        codes = (q.reshape(-1) + 8).astype(np.uint8)
        if codes.size % 2:
            codes = np.append(codes, np.uint8(8))
        return (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8), m

    def unpack(self, nibbles: np.ndarray, multipliers: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """The int8 array of ``shape`` that :meth:`pack` stored; ValueError when the arrays do not
        describe one."""
        rows = shape[0] if shape else 0
        size = int(np.prod(shape, dtype=np.int64))
        cols = size // rows if rows else 0
        groups = -(-cols // self.group_size)
        if (nibbles.dtype != np.uint8 or nibbles.shape != ((size + 1) // 2,) or multipliers.dtype != np.uint8
                or multipliers.shape != (rows, groups)):
            raise ValueError(f"packed arrays {nibbles.dtype}{list(nibbles.shape)} and "
                             f"{multipliers.dtype}{list(multipliers.shape)} do not describe i8{list(shape)} "
                             f"in groups of {self.group_size}")
        if ((multipliers < 1) | (multipliers > M_MAX)).any():
            raise ValueError(f"a group multiplier is outside [1, {M_MAX}]")
        codes = np.stack([nibbles & 15, nibbles >> 4], axis=1).reshape(-1)[:size].astype(np.int32)
        if ((codes < 8 - Q_MAX) | (codes > 8 + Q_MAX)).any():
            raise ValueError(f"a 4-bit value is outside [-{Q_MAX}, {Q_MAX}]")
        m = np.repeat(multipliers.astype(np.int32), self.group_size, axis=1)[:, :cols]
        return ((codes.reshape(rows, cols) - 8) * m).astype(np.int8).reshape(shape)

    def nbytes(self, array: np.ndarray) -> int:
        """Bytes the packed form takes: half a byte per element and one per group."""
        rows = array.shape[0]
        groups = -(-(array.size // max(rows, 1)) // self.group_size)
        return (array.size + 1) // 2 + rows * groups


def parse_storage(text: str) -> Int4Groups:
    """``i4/32`` -> Int4Groups(32); ValueError for anything else."""
    kind, _, size = text.partition("/")
    if kind != "i4" or not size.isdigit() or int(size) < 1:
        raise ValueError(f"unknown packed storage {text!r} (known: i4/GROUP_SIZE)")
    return Int4Groups(int(size))

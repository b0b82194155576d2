"""Tensor types: a static shape and a dtype, printed as ``f32[1,3,224,224]``.

Shapes are static on purpose: quantization and TVM's packed int8 schedules need concrete
extents, and a dynamic dimension is resolved at capture (the user names the shape)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# short IR name -> numpy dtype; the short names are what the text form prints
DTYPES: dict[str, np.dtype] = {
    "f64": np.dtype(np.float64),
    "f32": np.dtype(np.float32),
    "f16": np.dtype(np.float16),
    "i64": np.dtype(np.int64),
    "i32": np.dtype(np.int32),
    "i16": np.dtype(np.int16),
    "i8": np.dtype(np.int8),
    "u8": np.dtype(np.uint8),
    "u16": np.dtype(np.uint16),
    "u32": np.dtype(np.uint32),
    "u64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
}
_NAME_OF = {v: k for k, v in DTYPES.items()}

# the largest constant a model file may make qcompiler materialize (a ConstantOfShape, an .npz
# member): a few KB of file must not become gigabytes of memory before anything is checked
MAX_CONSTANT_BYTES = 4 << 30

FLOAT_DTYPES = frozenset({"f64", "f32", "f16"})
INT_DTYPES = frozenset({"i64", "i32", "i16", "i8", "u8", "u16", "u32", "u64"})


def dtype_name(dtype: object) -> str:
    """The IR name of a numpy (or numpy-convertible) dtype; raises ValueError if unsupported."""
    try:
        return _NAME_OF[np.dtype(dtype)]
    except (KeyError, TypeError) as e:
        raise ValueError(f"unsupported dtype {dtype}") from e


@dataclass(frozen=True)
class TensorType:
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype '{self.dtype}'")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if any(d < 0 for d in self.shape):
            raise ValueError(f"negative dimension in shape {self.shape}")

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @staticmethod
    def of(array: np.ndarray) -> "TensorType":
        return TensorType(tuple(array.shape), dtype_name(array.dtype))

    @property
    def nbytes(self) -> int:
        return self.size * self.np_dtype.itemsize

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(str(d) for d in self.shape)}]"

"""Streaming range observers for calibration. Memory is bounded by one histogram per value,
never by the activations themselves.

Histogram methods (percentile, entropy, mse) need a fixed bin range, so calibration runs
twice: a min-max sweep fixes each value's histogram edges, a second sweep fills them."""
from __future__ import annotations

import numpy as np


FLT_MAX = float(np.finfo(np.float32).max)


def extent(x: np.ndarray) -> tuple[float, float] | None:
    """The min and max of ``x`` without its NaNs, an infinity standing as the float32 extreme:
    a tensor that holds -inf (an attention mask) has a range no int8 grid can carry."""
    if np.all(np.isfinite(x)):
        return (float(x.min()), float(x.max())) if x.size else None
    finite = x[np.isfinite(x)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (np.inf, -np.inf)
    if np.any(np.isneginf(x)):
        lo, hi = -FLT_MAX, max(hi, -FLT_MAX)
    if np.any(np.isposinf(x)):
        lo, hi = min(lo, FLT_MAX), FLT_MAX
    return (lo, hi) if lo <= hi else None


class MinMax:
    """Exact running min and max (see ``extent``)."""

    def __init__(self) -> None:
        self.lo, self.hi = np.inf, -np.inf

    def update(self, x: np.ndarray) -> None:
        seen = extent(x)
        if seen is not None:
            self.lo = min(self.lo, seen[0])
            self.hi = max(self.hi, seen[1])

    def result(self) -> tuple[float, float]:
        return (self.lo, self.hi) if self.lo <= self.hi else (0.0, 0.0)


class MovingAverageMinMax:
    """Exponential moving average of per-batch min and max (PyTorch's MovingAverageMinMaxObserver)."""

    def __init__(self, averaging_constant: float) -> None:
        self.c = averaging_constant
        self.lo: float | None = None
        self.hi: float | None = None

    def update(self, x: np.ndarray) -> None:
        seen = extent(x)
        if seen is None:
            return
        lo, hi = seen
        if self.lo is None or self.hi is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo += self.c * (lo - self.lo)
            self.hi += self.c * (hi - self.hi)

    def result(self) -> tuple[float, float]:
        return (self.lo, self.hi) if self.lo is not None and self.hi is not None else (0.0, 0.0)


class Histogram:
    """A fixed-edge histogram over [lo, hi] (from a min-max sweep); out-of-range values
    land in the edge bins."""

    def __init__(self, lo: float, hi: float, bins: int) -> None:
        if hi <= lo:
            hi = lo + 1e-8
        self.lo, self.hi, self.bins = lo, hi, bins
        self.counts = np.zeros(bins, np.float64)

    def update(self, x: np.ndarray) -> None:
        finite = x[np.isfinite(x)].astype(np.float64)
        idx = np.clip(((finite - self.lo) / (self.hi - self.lo) * self.bins).astype(np.int64), 0, self.bins - 1)
        self.counts += np.bincount(idx, minlength=self.bins)

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.bins + 1)

    @property
    def centers(self) -> np.ndarray:
        e = self.edges
        return (e[:-1] + e[1:]) / 2


def percentile_range(h: Histogram, percentile: float) -> tuple[float, float]:
    """The (100 - p)th and pth percentiles of the histogrammed values."""
    cdf = np.cumsum(h.counts)
    total = cdf[-1]
    if total == 0:
        return (h.lo, h.hi)
    edges = h.edges
    hi = edges[min(int(np.searchsorted(cdf, total * percentile / 100.0)) + 1, h.bins)]
    lo = edges[int(np.searchsorted(cdf, total * (100.0 - percentile) / 100.0))]
    return (float(min(lo, 0.0) if h.lo < 0 else max(lo, h.lo)), float(hi))


def entropy_range(h: Histogram, levels: int) -> tuple[float, float]:
    """TensorRT's KL-divergence calibration on |x|: the clipping threshold t whose `levels`-level
    quantization of the clipped distribution loses the least information (min KL(P || Q))."""
    signed = h.lo < 0
    if signed:  # fold onto |x| with a symmetric grid
        m = max(-h.lo, h.hi)
        centers = np.abs(h.centers)
        counts, edges = np.histogram(centers, bins=h.bins // 2, range=(0, m), weights=h.counts)
        levels = levels // 2
    else:
        counts, edges = h.counts, h.edges
    n = len(counts)
    if counts.sum() == 0 or n <= levels:
        return (h.lo, h.hi)
    best_kl, best_i = np.inf, n
    step = max(1, (n - levels) // 256)
    for i in range(levels, n + 1, step):
        p = counts[:i].copy()
        p[-1] += counts[i:].sum()  # outliers clip into the last bin
        # Q: the first i bins merged into `levels` groups, each group's mass spread evenly
        # over its non-empty bins
        bounds = np.linspace(0, i, levels + 1).astype(np.int64)
        starts, sizes = bounds[:-1], np.diff(bounds)
        nonzero = counts[:i] > 0
        mass = np.add.reduceat(counts[:i], starts)
        filled = np.add.reduceat(nonzero.astype(np.float64), starts)
        per_bin = np.divide(mass, filled, out=np.zeros_like(mass), where=filled > 0)
        q = np.repeat(per_bin, sizes) * nonzero
        pn, qn = p / p.sum(), q / max(q.sum(), 1e-30)
        mask = pn > 0
        if np.any(qn[mask] == 0):
            continue
        kl = float(np.sum(pn[mask] * np.log(pn[mask] / qn[mask])))
        if kl < best_kl:
            best_kl, best_i = kl, i
    t = float(edges[best_i]) if signed else float(edges[best_i])
    return (max(h.lo, -t), min(h.hi, t)) if signed else (h.lo, t)


def mse_range(h: Histogram, levels: int, symmetric: bool) -> tuple[float, float]:
    """The clipping range (the calibrated one shrunk by a factor) whose quantize-dequantize
    round trip has the least expected squared error over the histogram."""
    x, n = h.centers, h.counts
    best, best_err = (h.lo, h.hi), np.inf
    for alpha in np.linspace(0.2, 1.0, 81):
        lo, hi = min(h.lo * alpha, 0.0), max(h.hi * alpha, 0.0)
        if symmetric:
            m = max(-lo, hi)
            lo, hi = -m, m
        scale = (hi - lo) / (levels - 1) or 1e-12
        zp = np.round(-lo / scale)
        q = np.clip(np.round(x / scale) + zp, 0, levels - 1)
        err = float(np.sum(n * (x - (q - zp) * scale) ** 2))
        if err < best_err:
            best_err, best = err, (lo, hi)
    return (float(best[0]), float(best[1]))

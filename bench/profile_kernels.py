"""Where a compiled model's time goes: each kernel of a qcompiler build timed alone on the
arguments it gets in a real run (``CompiledModel.profile``), grouped by
kind (numbered copies of one kernel summed).

    .venv/bin/python bench/profile_kernels.py [resnet18|mobilenet_v2|minilm] [--float] [--batch N]

Run with nothing else busy on the cores. Not part of `make test`."""
from __future__ import annotations

import argparse
import collections
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qcompiler  # noqa: E402
from qcompiler.examples import zoo  # noqa: E402


def model_and_data(name: str, batch: int):
    if name == "minilm":
        encoder, tokenizer = zoo.load_minilm()
        ids, mask = zoo.tokenize(tokenizer, zoo.CALIBRATION_SENTENCES, 128)
        calibration = [(ids[i:i + 1].numpy(), mask[i:i + 1].numpy()) for i in range(8)]
        return encoder, calibration
    photos = zoo.photo_crops(8 * batch, seed=0)
    return getattr(zoo, name)(), [(np.concatenate(photos[i:i + batch]),) for i in range(0, 8 * batch, batch)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="resnet18", choices=["resnet18", "mobilenet_v2", "minilm"])
    parser.add_argument("--float", action="store_true", help="profile the fp32 build instead of int8")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    model, calibration = model_and_data(args.model, args.batch)
    example = tuple(torch.from_numpy(a) for a in calibration[0])
    compiled = qcompiler.compile(model, example, calibration=None if args.float else calibration)
    groups: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for k in compiled.profile(*calibration[0]):
        kind = re.sub(r"\d+$", "", k["kernel"])
        groups[kind][0] += k["ms"]
        groups[kind][1] += k["calls"]
    total = sum(ms for ms, _ in groups.values())
    table = Table(title=f"{args.model} {'fp32' if args.float else 'int8'} batch {args.batch}: "
                        f"{total:.2f} ms in kernels (each timed alone)")
    for col in ("kernel", "calls", "ms", "share"):
        table.add_column(col, justify="left" if col == "kernel" else "right")
    for kind, (ms, calls) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:15]:
        table.add_row(kind[:70], str(calls), f"{ms:.3f}", f"{100 * ms / total:.0f}%")
    Console().print(table)


if __name__ == "__main__":
    main()

"""Latency against the peers, in one run: PyTorch fp32 eager, PyTorch int8 (PT2E via torchao,
when installed), ONNX Runtime fp32 and int8 (static QDQ, U8S8, per-channel: its fastest form
here), qcompiler fp32 and int8 (TVM, untuned; with --tune-trials also tuned). Medians and minimums of repeated runs, and
ratios to ONNX Runtime int8.

    .venv/bin/python bench/compare_peers.py [--models resnet18 mobilenet_v2 minilm] [--batches 1 8] [--tune-trials N]

Run with nothing else busy on the cores: each measurement checks the load average and is
repeated once when the machine was busy. Not part of `make test`."""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qcompiler  # noqa: E402
from qcompiler.examples import peers, zoo  # noqa: E402


def measure(fn, inputs, seconds: float = 3.0, max_runs: int = 50) -> tuple[float, float]:
    """(median, min) in ms; repeated once if the 1-minute load says another process was busy."""
    for attempt in range(2):
        fn(*inputs)
        times, start = [], time.perf_counter()
        while len(times) < 5 or (time.perf_counter() - start < seconds and len(times) < max_runs):
            t = time.perf_counter()
            fn(*inputs)
            times.append((time.perf_counter() - t) * 1e3)
        busy = os.getloadavg()[0] > (os.cpu_count() or 2) + 0.5
        if not busy:
            break
    return statistics.median(times), min(times)


def onnx_sessions(model, example, names, calibration, tmp: Path):
    float_path = peers.export_onnx(model, example, names, tmp / "f.onnx")
    int8_path = peers.onnxruntime_int8(float_path, names, calibration, tmp / "q.onnx")
    return {"ONNX Runtime fp32": (peers.session(float_path, names), float_path.stat().st_size),
            "ONNX Runtime int8 (QDQ U8S8)": (peers.session(int8_path, names), int8_path.stat().st_size)}


def pt2e_int8(model, example):
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (X86InductorQuantizer,
                                                                                get_default_x86_inductor_quantization_config)
    except ImportError:
        return None, "torchao not installed"
    try:
        exported = torch.export.export(model, example).module()
        quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        prepared(*example)
        compiled = torch.compile(convert_pt2e(prepared))
        compiled(*example)
    except Exception as e:  # noqa: BLE001  the peer's own failure, reported in the table
        return None, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
    return (lambda *xs: compiled(*[torch.from_numpy(x) for x in xs])), None


def cases(models, batches):
    for name in models:
        if name == "minilm":
            encoder, tokenizer = zoo.load_minilm()
            ids, mask = zoo.tokenize(tokenizer, zoo.SENTENCES[:1], 128)
            cal_ids, cal_mask = zoo.tokenize(tokenizer, zoo.CALIBRATION_SENTENCES, 128)
            calibration = [(cal_ids[i:i + 1].numpy(), cal_mask[i:i + 1].numpy()) for i in range(8)]
            yield "MiniLM seq 128, batch 1", encoder, (ids, mask), ["input_ids", "attention_mask"], calibration
            continue
        model = getattr(zoo, name)()
        for batch in batches:
            photos = zoo.photo_crops(8 * batch, seed=0)
            calibration = [(np.concatenate(photos[i:i + batch]),) for i in range(0, 8 * batch, batch)]
            yield f"{name} batch {batch}", model, (torch.from_numpy(calibration[0][0]),), ["x"], calibration


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2", "minilm"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--tune-trials", type=int, default=0, metavar="N",
                        help="also build int8 with tune=True and N MetaSchedule trials (records kept in "
                             "bench/tuning/<model>); 0: skip the tuned row")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    torch.set_num_threads(os.cpu_count() or 2)
    console = Console()
    for label, model, example, names, calibration in cases(args.models, args.batches):
        inputs = [e.numpy() for e in example]
        rows = {}
        with tempfile.TemporaryDirectory() as d, console.status(f"{label}: building..."):

            def torch_fp32(*xs):
                with torch.no_grad():
                    return model(*[torch.from_numpy(x) for x in xs])

            runners = {"PyTorch fp32 eager": (torch_fp32, None)}
            pt2e, why = pt2e_int8(model, example)
            runners["PyTorch int8 (PT2E, torchao)"] = (pt2e, None) if pt2e else (None, why)
            runners.update({k: (fn, size) for k, (fn, size) in onnx_sessions(model, example, names, calibration,
                                                                             Path(d)).items()})
            builds = [(False, "qcompiler fp32 (TVM, untuned)", {}), (True, "qcompiler int8 (TVM, untuned)", {})]
            if args.tune_trials:
                database = Path(__file__).parent / "tuning" / label.split(",")[0].replace(" ", "_")
                builds.append((True, "qcompiler int8 (TVM, tuned)",
                               {"tune": True, "tuning_db": database, "tuning_trials": args.tune_trials}))
            for quantize, tag, tuning in builds:
                start = time.perf_counter()
                compiled = qcompiler.compile(model, example, calibration=calibration if quantize else None, **tuning)
                runners[tag] = (compiled, f"compile {time.perf_counter() - start:.0f} s")
            for tag, (fn, note) in runners.items():
                if fn is None:
                    rows[tag] = (None, None, note)
                    continue
                with console.status(f"{label}: {tag}"):
                    median, minimum = measure(fn, inputs)
                rows[tag] = (median, minimum, note if isinstance(note, str) else "")
        reference = rows["ONNX Runtime int8 (QDQ U8S8)"][0]
        table = Table(title=label)
        for col in ("runtime", "median ms", "min ms", "x ONNX Runtime int8", "note"):
            table.add_column(col, justify="left" if col in ("runtime", "note") else "right")
        for tag, (median, minimum, note) in rows.items():
            if median is None:
                table.add_row(tag, "-", "-", "-", note)
            else:
                table.add_row(tag, f"{median:.2f}", f"{minimum:.2f}", f"{median / reference:.2f}", note)
        console.print(table)


if __name__ == "__main__":
    main()

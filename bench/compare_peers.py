"""Latency against the peers, each in its own fresh process, interleaved: PyTorch fp32 eager,
PyTorch int8 (PT2E via torchao, when installed), ONNX Runtime fp32 and int8 (static QDQ, U8S8,
per-channel: its fastest form here), OpenVINO (where ``pip install qcompiler[openvino]`` put it:
its default precision on the float model, bf16 where AMX has it; NNCF's int8; and ORT's QDQ
model), qcompiler fp32 and int8 (TVM, untuned; with --tune-trials also tuned). Each runtime's
output SQNR against PyTorch fp32 is printed beside its latency; latencies are medians over
``--rounds`` processes (each the median of its own repeated runs), with ratios to the fastest
peer and to ONNX Runtime int8. A last row times qcompiler int8 in a process that has just
compiled it (torch has run there): what a compile-then-run user sees.

    .venv/bin/python bench/compare_peers.py [--models resnet18 mobilenet_v2 minilm] [--batches 1 8]
        [--rounds 3] [--tune-trials N] [--cpu haswell --onednn-isa AVX2] [--static-too]

Run with nothing else busy on the cores: each measurement checks the load average and is
repeated once when the machine was busy. Not part of `make test`."""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import statistics
import subprocess
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

# runtime label -> worker kind; the peers first, then qcompiler
RUNTIMES = {
    "PyTorch fp32 eager": "torch",
    "PyTorch int8 (PT2E, torchao)": "pt2e",
    "ONNX Runtime fp32": "ort-fp32",
    "ONNX Runtime int8 (QDQ U8S8)": "ort-int8",
    "OpenVINO default precision": "ov-default",
    "OpenVINO int8 (NNCF)": "ov-nncf",
    "OpenVINO int8 (ORT's QDQ model)": "ov-qdq",
    "qcompiler fp32": "qc-fp32",
    "qcompiler int8": "qc-int8",
    "qcompiler int8, static scales only (per_token off)": "qc-static",
    "qcompiler int8 (tuned)": "qc-int8-tuned",
    "qcompiler int8 + bf16/fp32 to a target SQNR": "qc-target",
    "qcompiler int8, compiled in the process it runs in": "qc-int8-compiled-here",
}
QCOMPILER = {"qc-fp32", "qc-int8", "qc-static", "qc-int8-tuned", "qc-target", "qc-int8-compiled-here"}


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
    """(label, model name, batch, model, example, input names, calibration) for each case."""
    for name in models:
        if name == "minilm":
            encoder, tokenizer = zoo.load_minilm()
            ids, mask = zoo.tokenize(tokenizer, zoo.SENTENCES[:1], 128)
            cal_ids, cal_mask = zoo.tokenize(tokenizer, zoo.CALIBRATION_SENTENCES, 128)
            calibration = [(cal_ids[i:i + 1].numpy(), cal_mask[i:i + 1].numpy()) for i in range(8)]
            yield "MiniLM seq 128, batch 1", name, 1, encoder, (ids, mask), ["input_ids", "attention_mask"], calibration
            continue
        model = getattr(zoo, name)()
        for batch in batches:
            photos = zoo.photo_crops(8 * batch, seed=0)
            calibration = [(np.concatenate(photos[i:i + batch]),) for i in range(0, 8 * batch, batch)]
            yield (f"{name} batch {batch}", name, batch, model, (torch.from_numpy(calibration[0][0]),), ["x"],
                   calibration)


def prepare(case, directory: Path, tune_trials: int, cpu: str | None, console: Console,
            target_sqnr: float | None = None, static_too: bool = False) -> dict[str, str]:
    """Every runtime's model written to ``directory`` (ONNX, OpenVINO IR, qcompiler artifacts)
    for the workers; returns the notes per runtime (compile times, why one is missing)."""
    label, name, batch, model, example, names, calibration = case
    np.savez(directory / "inputs.npz", *[e.numpy() for e in example])
    (directory / "case.json").write_text(json.dumps({"model": name, "batch": batch, "names": names, "cpu": cpu}))
    notes: dict[str, str] = {}
    if importlib.util.find_spec("torchao") is None:
        notes["pt2e"] = "unavailable: torchao not installed"
    float_path = peers.export_onnx(model, example, names, directory / "f.onnx")
    peers.onnxruntime_int8(float_path, names, calibration, directory / "q.onnx")
    try:
        peers.save_openvino_nncf_int8(float_path, names, calibration, directory / "nncf.xml",
                                      transformer=name == "minilm")
    except ImportError:
        for kind in ("ov-default", "ov-nncf", "ov-qdq"):
            notes[kind] = "unavailable: openvino/nncf not installed"
    builds = {"qc-fp32": {}, "qc-int8": {"calibration": calibration}}
    if tune_trials:
        database = Path(__file__).parent / "tuning" / label.replace(" ", "_")
        builds["qc-int8-tuned"] = {"calibration": calibration, "tune": True, "tuning_db": database,
                                   "tuning_trials": tune_trials}
    else:
        notes["qc-int8-tuned"] = "skip"
    if static_too:
        builds["qc-static"] = {"calibration": calibration, "config": qcompiler.QuantConfig(per_token="off")}
    else:
        notes["qc-static"] = "skip"
    if target_sqnr is not None:
        builds["qc-target"] = {"calibration": calibration,
                               "config": qcompiler.QuantConfig(target_output_sqnr_db=target_sqnr)}
    else:
        notes["qc-target"] = "skip"
    for kind, options in builds.items():
        with console.status(f"{label}: compiling {kind}..."):
            start = time.perf_counter()
            compiled = qcompiler.compile(model, example, cpu=cpu, **options)
            notes[kind] = f"compile {time.perf_counter() - start:.0f} s"
            compiled.save(directory / kind)
        if kind == "qc-int8":
            notes[kind] += f"; {compiled.report()['int8_kernels']['kernels'] or 'generic'} kernels"
        if kind in ("qc-int8", "qc-static", "qc-target"):
            kept = compiled.report()["kept_float"]
            bf16 = sum(1 for e in kept if e.get("precision") == "bf16")
            per_token = len(compiled.report().get("per_token", []))
            notes[kind] += (f"; {per_token} per-token" if per_token else "") + \
                f"; {bf16} layers bf16, {len(kept) - bf16} float" + (
                f"; target {target_sqnr:g} dB" if kind == "qc-target" else "")
    return notes


def runner(kind: str, directory: Path):
    """The runtime ``kind`` of the case in ``directory``, called like a model on numpy arrays."""
    spec = json.loads((directory / "case.json").read_text())
    names = spec["names"]
    if kind in ("torch", "pt2e", "qc-int8-compiled-here"):
        torch.set_num_threads(os.cpu_count() or 2)
        _, _, _, model, example, _, calibration = next(cases([spec["model"]], [spec["batch"]]))
        if kind == "qc-int8-compiled-here":
            return qcompiler.compile(model, example, calibration=calibration, cpu=spec["cpu"])
        if kind == "pt2e":
            pt2e, why = pt2e_int8(model, example)
            if pt2e is None:
                raise RuntimeError(why)
            return pt2e

        def eager(*xs):
            with torch.no_grad():
                return model(*[torch.from_numpy(x) for x in xs])

        return eager
    if kind in ("ort-fp32", "ort-int8"):
        return peers.session(directory / ("f.onnx" if kind == "ort-fp32" else "q.onnx"), names)
    if kind.startswith("ov-"):
        path = {"ov-default": "f.onnx", "ov-nncf": "nncf.xml", "ov-qdq": "q.onnx"}[kind]
        return peers.openvino_session(directory / path, names)
    return qcompiler.load(directory / kind)


def first_output(result) -> np.ndarray:
    while isinstance(result, (tuple, list)):
        result = result[0]
    if isinstance(result, dict):
        result = next(iter(result.values()))
    if hasattr(result, "last_hidden_state"):
        result = result.last_hidden_state
    return result.detach().numpy() if isinstance(result, torch.Tensor) else np.asarray(result)


def worker(kind: str, directory: Path, seconds: float) -> None:
    """One runtime in this fresh process: its output saved for the fidelity column, its median
    and minimum printed as one JSON line."""
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    with np.load(directory / "inputs.npz") as data:
        inputs = [data[f"arr_{i}"] for i in range(len(data.files))]
    fn = runner(kind, directory)
    np.save(directory / f"out-{kind}.npy", first_output(fn(*inputs)).astype(np.float32))
    median, minimum = measure(fn, inputs, seconds)
    print(json.dumps({"median": median, "min": minimum}))


def in_fresh_process(kind: str, directory: Path, seconds: float, onednn_isa: str | None) -> tuple[float | None, str]:
    env = {**os.environ, **({"ONEDNN_MAX_CPU_ISA": onednn_isa} if onednn_isa else {})}
    done = subprocess.run([sys.executable, __file__, "--worker", kind, str(directory), "--seconds", str(seconds)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return None, f"failed: {lines[-1][:80] if lines else done.returncode}"
    return json.loads(done.stdout.strip().splitlines()[-1])["median"], ""


def sqnr_db(reference: np.ndarray, output: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - output.reshape(reference.shape)) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.sum(reference.astype(np.float64) ** 2)) / noise)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2", "minilm"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per runtime (interleaved)")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed runs per process, at least 5")
    parser.add_argument("--cpu", help="build qcompiler for this CPU (e.g. haswell: the AVX2 kernels) instead of the host")
    parser.add_argument("--onednn-isa", metavar="ISA",
                        help="ONEDNN_MAX_CPU_ISA for the PyTorch and OpenVINO processes (e.g. AVX2, with --cpu "
                             "haswell); ONNX Runtime has no such limit and uses what the host has")
    parser.add_argument("--tune-trials", type=int, default=0, metavar="N",
                        help="also build int8 with tune=True and N MetaSchedule trials (records kept in "
                             "bench/tuning/<model>); 0: skip the tuned row")
    parser.add_argument("--target-sqnr", type=float, metavar="DB",
                        help="also build with QuantConfig(target_output_sqnr_db=DB): layers int8 cannot carry go "
                             "to bf16 (AMX-BF16) or fp32 until the output meets DB")
    parser.add_argument("--static-too", action="store_true",
                        help="also build int8 with per_token='off' (static activation scales only)")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]), args.seconds)
        return
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    torch.set_num_threads(os.cpu_count() or 2)
    console = Console(width=max(Console().width, 130))
    for case in cases(args.models, args.batches):
        label = case[0]
        with tempfile.TemporaryDirectory() as d:
            directory = Path(d)
            notes = prepare(case, directory, args.tune_trials, args.cpu, console, args.target_sqnr, args.static_too)
            if args.onednn_isa:
                for kind in ("ort-fp32", "ort-int8"):
                    notes.setdefault(kind, "host ISA (no limit)")
            kinds = [k for k in RUNTIMES.values() if notes.get(k) != "skip"]
            times: dict[str, list[float]] = {k: [] for k in kinds}
            for round_ in range(args.rounds):
                for kind in kinds:
                    if notes.get(kind, "").startswith(("failed", "unavailable")):
                        continue
                    with console.status(f"{label}: {kind}, process {round_ + 1}/{args.rounds}"):
                        median, why = in_fresh_process(kind, directory, args.seconds, args.onednn_isa)
                    if median is None:
                        notes[kind] = why
                    else:
                        times[kind].append(median)
            with torch.no_grad():
                reference = first_output(case[3](*case[4]))
            fidelity = {k: sqnr_db(reference, np.load(directory / f"out-{k}.npy"))
                        for k in kinds if (directory / f"out-{k}.npy").exists()}
        medians = {k: statistics.median(v) for k, v in times.items() if v}
        uncapped = {"ort-fp32", "ort-int8"} if args.onednn_isa else set()  # not comparable: the host's ISA
        peer_best = min((m for k, m in medians.items() if k not in QCOMPILER | uncapped), default=math.nan)
        ort_int8 = medians.get("ort-int8", math.nan)
        table = Table(title=f"{label} (medians of {args.rounds} fresh processes, ms)")
        for col in ("runtime", "median ms", "x best peer", "x ORT int8", "SQNR vs fp32", "note"):
            table.add_column(col, justify="left" if col in ("runtime", "note") else "right")
        for tag, kind in RUNTIMES.items():
            if kind not in kinds:
                continue
            if kind not in medians:
                table.add_row(tag, "-", "-", "-", "-", notes.get(kind, ""))
                continue
            db = fidelity.get(kind, math.nan)
            table.add_row(tag, f"{medians[kind]:.2f}", f"{medians[kind] / peer_best:.2f}",
                          f"{medians[kind] / ort_int8:.2f}", "exact" if db == math.inf else f"{db:.1f} dB",
                          notes.get(kind, ""))
        console.print(table)


if __name__ == "__main__":
    main()

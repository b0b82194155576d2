"""all-MiniLM-L6-v2 on 256 real sentences (``zoo.documentation_sentences``): mean and worst
cosine of each build's sentence embeddings to PyTorch fp32, qcompiler's configs beside ONNX
Runtime (static QDQ, simulated; dynamic, on its kernels) and NNCF's int8 on OpenVINO, all
calibrated on the same 8 sentences (one per batch), in one run; and qcompiler's latency at
128 tokens, batch 1, its builds timed interleaved in this process (medians of rounds).

    .venv/bin/python bench/minilm_sentences.py [--count 256] [--rounds 5]

Issue 14's bar: mean cosine >= 0.998 at lower latency than the int8 build. Run with nothing
else busy on the cores. Not part of `make test`."""
from __future__ import annotations

import argparse
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

NAMES = ["input_ids", "attention_mask"]
CONFIGS = {  # on a CPU without AMX-BF16 the default is per-token scales with SmoothQuant on this encoder
    "qcompiler int8 (default)": {},
    "qcompiler int8, per_token=all, smooth_quant off": {"per_token": "all", "smooth_quant": False},
    "qcompiler int8, former default (per_token=fallback, smooth_quant off)": {"per_token": "fallback",
                                                                               "smooth_quant": False},
}


def cosines(want: np.ndarray, got: np.ndarray) -> np.ndarray:
    return (want * got).sum(1) / np.linalg.norm(want, axis=1) / np.linalg.norm(got, axis=1)


def peer_runs(encoder, calibration: list[tuple], tmp: Path) -> dict:
    """The peers as callables on one sentence's (ids, mask); a missing one as its reason."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    example = tuple(torch.from_numpy(a) for a in calibration[0])
    float_path = peers.export_onnx(encoder, example, NAMES, tmp / "float.onnx")
    quantize_dynamic(str(float_path), str(tmp / "dynamic.onnx"), weight_type=QuantType.QInt8)
    runs: dict = {
        "ONNX Runtime int8 static (QDQ, simulated)": peers.session(
            peers.onnxruntime_int8(float_path, NAMES, calibration, tmp / "static.onnx"), NAMES, simulated=True),
        "ONNX Runtime int8 dynamic (its kernels)": peers.session(tmp / "dynamic.onnx", NAMES)}
    try:
        runs["NNCF int8 (transformer) on OpenVINO"] = peers.openvino_nncf_int8(float_path, NAMES, calibration,
                                                                              transformer=True)
    except ImportError:
        runs["NNCF int8 (transformer) on OpenVINO"] = "not installed"
    return runs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    console = Console()
    encoder, tokenizer = zoo.load_minilm()
    ids, mask = zoo.tokenize(tokenizer, zoo.documentation_sentences(args.count), 128)
    cal_ids, cal_mask = zoo.tokenize(tokenizer, zoo.CALIBRATION_SENTENCES, 128)
    calibration = [(cal_ids[i:i + 1].numpy(), cal_mask[i:i + 1].numpy()) for i in range(len(cal_ids))]
    with torch.no_grad():
        want = encoder(ids, mask).numpy()
    graph = qcompiler.from_torch(encoder, (cal_ids[:1], cal_mask[:1]))
    builds, compile_s = {}, {}
    for label, options in CONFIGS.items():
        with console.status(f"compiling {label}..."):
            start = time.time()
            builds[label] = qcompiler.compile(graph, calibration=calibration, config=qcompiler.QuantConfig(**options))
            compile_s[label] = time.time() - start
    latencies: dict[str, list[float]] = {label: [] for label in builds}
    with console.status("timing qcompiler's builds, interleaved (before any peer's threads exist)..."):
        for _ in range(args.rounds):
            for label, build in builds.items():
                seconds, _ = build.latencies(*calibration[0], iterations=30, warmup=5)
                latencies[label].append(float(np.median(seconds)) * 1e3)
    with tempfile.TemporaryDirectory() as d, console.status("the peers..."):
        runs = {**{label: (lambda *x, b=b: np.asarray(b(*x))) for label, b in builds.items()},
                **peer_runs(encoder, calibration, Path(d))}
        scores = {}
        for label, run in runs.items():
            if isinstance(run, str):
                scores[label] = run
                continue
            got = np.concatenate([np.asarray(run(ids[i:i + 1].numpy(), mask[i:i + 1].numpy())).reshape(1, -1)
                                  for i in range(len(ids))])
            scores[label] = cosines(want, got)
    table = Table(title=f"all-MiniLM-L6-v2, {args.count} documentation sentences (seq 128), cosine to fp32")
    for col in ("build", "mean cosine", "worst", "ms (batch 1, median of rounds)", "compile s"):
        table.add_column(col)
    for label, score in scores.items():
        cells = (score, "") if isinstance(score, str) else (f"{score.mean():.4f}", f"{score.min():.4f}")
        ms = f"{np.median(latencies[label]):.2f}" if label in latencies else ""
        table.add_row(label, *cells, ms, f"{compile_s[label]:.0f}" if label in compile_s else "")
    console.print(table)


if __name__ == "__main__":
    main()

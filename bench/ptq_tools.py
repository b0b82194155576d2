"""The opt-in post-training tools side by side with the peers, in one run: cross-layer
equalization, the per-activation range search and SmoothQuant with a strength per layer, each on
the generated model it was built for (the tests' models) and on the benchmark's ResNet-18, against
qcompiler's default config, ONNX Runtime's quantize_static and NNCF (where installed), all on the
same calibration data; output SQNR (dB, median over held-out batches), quantization time and the
layers the sensitivity check kept float.

    .venv/bin/python bench/ptq_tools.py [--skip-resnet]

Not part of `make test`."""
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

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import qcompiler  # noqa: E402
from qcompiler import QuantConfig, from_torch  # noqa: E402
from qcompiler.compare import sqnr_db  # noqa: E402
from qcompiler.examples import zoo  # noqa: E402
from quant_accuracy import peer_int8  # noqa: E402
from tests.test_cross_layer_equalization import _mobile_net  # noqa: E402
from tests.test_search_ranges import SpikesThenMaxPool, _spiky_batches  # noqa: E402
from tests.test_smooth_quant import NormThenMLP  # noqa: E402


def models():
    """(name, model, calibration batches, held-out batches, the tool's config fields)."""
    rng = np.random.default_rng(0)
    separable = [rng.standard_normal((8, 3, 16, 16)).astype(np.float32) for _ in range(5)]
    yield "depthwise-separable, spread batch norms", _mobile_net(), separable[:4], separable[4:], \
        {"cross_layer_equalization": True}
    torch.manual_seed(0)
    spiky = _spiky_batches(np.random.default_rng(0), 7)
    yield "input spikes + max pool", SpikesThenMaxPool().eval(), spiky[:4], spiky[4:], {"range_search": True}
    torch.manual_seed(0)
    tokens = [np.random.default_rng(0).standard_normal((4, 32, 64)).astype(np.float32) for _ in range(7)]
    yield "layer norm with 200x channels + MLP", NormThenMLP().eval(), tokens[:4], tokens[4:], {"smooth_quant": True}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-resnet", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    cases = list(models())
    if not args.skip_resnet:
        crops = zoo.photo_crops(12, seed=0)
        for fields in ({"cross_layer_equalization": True}, {"range_search": True}):
            cases.append(("ResNet-18 (random init, photos)", zoo.resnet18(), crops[:8], crops[8:], fields))
    table = Table(title="post-training tools: output SQNR dB on held-out data (quantize time, layers kept float)")
    for col in ("model", "tool", "qcompiler default", "qcompiler + tool", "ONNX Runtime int8", "NNCF int8"):
        table.add_column(col)
    with tempfile.TemporaryDirectory() as d:
        for name, model, calibration, held_out, fields in cases:
            graph = from_torch(model, (torch.from_numpy(calibration[0]),))

            def measured(run) -> str:
                if run is None or isinstance(run, str):
                    return "n/a" if run is None else run
                return f"{np.median([sqnr_db(graph(x)[0], np.asarray(run(x))) for x in held_out]):.1f}"

            cells = []
            for config in (QuantConfig(), QuantConfig(**fields)):
                start = time.perf_counter()
                result = qcompiler.quantize(graph, calibration, config)
                cells.append(f"{measured(lambda x, g=result.graph: g(x)[0])} ({time.perf_counter() - start:.0f} s, "
                             f"{len(result.report.get('kept_float', []))} float)")
            ort, nncf, _ = peer_int8(model, (torch.from_numpy(calibration[0]),), ["x"],
                                     [(x,) for x in calibration], Path(d))
            table.add_row(name, ", ".join(fields), *cells, measured(ort), measured(nncf))
    Console(width=170).print(table)


if __name__ == "__main__":
    main()

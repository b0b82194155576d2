"""Quantization fidelity, qcompiler vs ONNX Runtime's quantize_static (QDQ, per-channel int8
weights, uint8 activations, MinMax calibration) and OpenVINO + NNCF int8 (default preset; where
``pip install qcompiler[openvino]`` put them) on the same calibration data, in one run.

    .venv/bin/python bench/quant_accuracy.py [--skip-fashion] [--target-sqnr DB]

Prints, per model: the float metric, qcompiler int8, the peers' int8 (their QDQ models run
with dequantize -> float op -> quantize, which is what their algorithms decided on any CPU;
NNCF's also on OpenVINO's int8 kernels, which on a CPU without VNNI saturate) (accuracy for the
classifiers, mean cosine to the float embeddings for MiniLM, output SQNR for the random-weight
CNNs on real photos; MiniLM on its 8 sentences and on 256 sentences of Python's documentation,
``zoo.documentation_sentences``). ``--target-sqnr`` adds a column: qcompiler with the precision search at
that target. Not part of `make test`."""
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
from qcompiler import from_torch  # noqa: E402
from qcompiler.examples import peers, zoo  # noqa: E402
from qcompiler.compare import sqnr_db  # noqa: E402


def peer_int8(model: torch.nn.Module, example: tuple, names: list[str], calibration: list[tuple], tmp: Path,
              transformer: bool = False):
    """The peers' int8 models as callables: ONNX Runtime's and NNCF's QDQ models run simulated
    (their algorithms' fidelity), then NNCF's int8 on OpenVINO's kernels for this CPU. None
    where NNCF is not installed, the error's name where it fails on the model."""
    float_path = peers.export_onnx(model, example, names, tmp / "float.onnx")
    ort = peers.session(peers.onnxruntime_int8(float_path, names, calibration, tmp / "int8.onnx"), names,
                        simulated=True)

    def nncf(make):
        try:
            return make()
        except ImportError:
            return None
        except Exception as e:  # a peer's crash is a result, not the benchmark's end
            return f"fails ({type(e).__name__})"

    simulated = nncf(lambda: peers.session(peers.nncf_onnx_int8(float_path, names, calibration, tmp / "nncf.onnx",
                                                                transformer), names, simulated=True))
    return ort, simulated, nncf(lambda: peers.openvino_nncf_int8(float_path, names, calibration, transformer))


def ours(graph, calibration: list[tuple], target: float | None) -> list:
    """qcompiler's integer graphs: the default config, and with the precision search at ``target``."""
    configs = [qcompiler.QuantConfig()] + ([qcompiler.QuantConfig(target_output_sqnr_db=target)] if target else [])
    return [qcompiler.quantize(graph, calibration, config).graph for config in configs]


def cells(metric, runs: list) -> list[str]:
    return ["n/a" if run is None else run if isinstance(run, str) else metric(run) for run in runs]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-fashion", action="store_true")
    parser.add_argument("--target-sqnr", type=float, metavar="DB")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    rows = []
    console = Console()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)

        def classifier(name, model, data, batch):
            x_train, _, x_test, y_test = data
            example = (torch.from_numpy(x_test[:batch]),)
            cal = [(x_train[i:i + batch],) for i in range(0, 8 * batch, batch)]
            graph = from_torch(model, example)
            runs = [lambda x, g=g: g(x)[0] for g in ours(graph, cal, args.target_sqnr)]
            runs += peer_int8(model, example, ["x"], cal, tmp)
            chunks = range(0, len(x_test) - batch + 1, batch)
            with torch.no_grad():
                f = np.concatenate([model(torch.from_numpy(x_test[i:i + batch])).numpy() for i in chunks])
            outs = [r if r is None or isinstance(r, str) else np.concatenate([r(x_test[i:i + batch]) for i in chunks])
                    for r in runs]
            labels, agree = y_test[:len(f)], f.argmax(-1)  # agreement: how often int8 predicts what float does
            rows.append((name, "top-1 accuracy", f"{zoo.accuracy(f, labels):.4f}",
                         *cells(lambda o: f"{zoo.accuracy(o, labels):.4f}", outs)))
            rows.append((name, "top-1 agreement with float", "1.0000",
                         *cells(lambda o: f"{zoo.accuracy(o, agree):.4f}", outs)))

        with console.status("digits CNN..."):
            model, data = zoo.train_digits_cnn()
            classifier("digits CNN (sklearn, 360 test)", model, data, 40)
        if not args.skip_fashion:
            with console.status("Fashion-MNIST CNN (training 2 epochs)..."):
                model, data = zoo.train_fashion_cnn()
                classifier("Fashion-MNIST CNN (10k test)", model, data, 100)

        with console.status("MiniLM..."):
            encoder, tokenizer = zoo.load_minilm()
            ids, mask = zoo.tokenize(tokenizer, zoo.SENTENCES, 128)
            cal_ids, cal_mask = zoo.tokenize(tokenizer, zoo.CALIBRATION_SENTENCES, 128)
            cal = [(cal_ids.numpy(), cal_mask.numpy())]
            graph = from_torch(encoder, (ids, mask))
            runs = [lambda *x, g=g: g(*x)[0] for g in ours(graph, cal, args.target_sqnr)]
            runs += peer_int8(encoder, (ids, mask), ["input_ids", "attention_mask"], cal, tmp, transformer=True)
            with torch.no_grad():
                f = encoder(ids, mask).numpy()
            rows.append(("all-MiniLM-L6-v2 (8 sentences)", "mean cosine to float", "1.0000",
                         *cells(lambda r: f"{cosine(f, r(ids.numpy(), mask.numpy())):.4f}", runs)))
            # the same builds on 256 real sentences of Python's documentation, 8 at a time
            doc_ids, doc_mask = zoo.tokenize(tokenizer, zoo.documentation_sentences(256), 128)
            with torch.no_grad():
                f = encoder(doc_ids, doc_mask).numpy()

            def embed(r):
                return np.concatenate([r(doc_ids[i:i + 8].numpy(), doc_mask[i:i + 8].numpy())
                                       for i in range(0, len(doc_ids), 8)])
            rows.append(("all-MiniLM-L6-v2 (256 documentation sentences)", "mean cosine to float", "1.0000",
                         *cells(lambda r: f"{cosine(f, embed(r)):.4f}", runs)))

        for name in ("resnet18", "mobilenet_v2"):
            with console.status(f"{name}..."):
                model = getattr(zoo, name)()
                cal = [(x,) for x in zoo.photo_crops(8, seed=0)]
                evaluation = zoo.photo_crops(4, seed=1)
                graph = from_torch(model, (torch.from_numpy(evaluation[0]),))
                runs = [lambda x, g=g: g(x)[0] for g in ours(graph, cal, args.target_sqnr)]
                runs += peer_int8(model, (torch.from_numpy(evaluation[0]),), ["x"], cal, tmp)
                rows.append((f"{name} (random weights, real photos)", "output SQNR dB (median)", "inf",
                             *cells(lambda r: f"{np.median([sqnr_db(graph(x)[0], r(x)) for x in evaluation]):.1f}",
                                    runs)))

    table = Table(title="int8 fidelity: qcompiler vs its peers (same calibration data)")
    columns = ["model", "metric", "float", "qcompiler int8"]
    columns += [f"qcompiler int8, target {args.target_sqnr:g} dB"] if args.target_sqnr else []
    for col in columns + ["ONNX Runtime int8", "NNCF int8", "NNCF int8 on OpenVINO's kernels"]:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)


if __name__ == "__main__":
    start = time.time()
    main()
    print(f"({time.time() - start:.0f} s)")

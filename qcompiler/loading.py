"""Turning what a user names on the command line into a Graph: an ONNX file, a saved IR file,
or ``package.module:function`` returning ``(torch_module, example_inputs)``."""
from __future__ import annotations

import importlib
import re
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ModelLoadError, QCompilerError
from .ir import Graph, load_graph


def load_model(spec: str, input_shapes: Mapping[str, Sequence[int]] | None = None,
               input_values: Mapping[str, Sequence[float]] | None = None) -> Graph:
    path = Path(spec)
    if path.suffix == ".onnx":
        from .capture import from_onnx

        return from_onnx(path, input_shapes, input_values=input_values)
    if input_values:
        raise ModelLoadError(f"{spec}: --input-value applies to ONNX models only")
    if path.suffix in (".qir", ".mlir", ".txt"):
        return load_graph(path)
    if not path.exists() and is_python_factory(spec):
        return _from_python(spec)
    if not path.exists():
        raise ModelLoadError(f"{spec}: no such file")
    raise ModelLoadError(f"{spec}: unknown model kind (expected .onnx, .qir, or module:function)")


MODEL_SUFFIXES = ("onnx", "qir", "mlir", "txt", "npz", "pt", "pth")
_FACTORY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def is_python_factory(spec: str) -> bool:
    """``package.module:function`` and nothing that could be a file name: ``model.onnx:v2``
    (a path with a colon) must never import ``./model.py``."""
    module = spec.partition(":")[0]
    return bool(_FACTORY.fullmatch(spec)) and module.rsplit(".", 1)[-1].lower() not in MODEL_SUFFIXES


def _import_function(spec: str):
    """The function ``package.module:function`` names (the current folder first on the path)."""
    module_name, _, func_name = spec.partition(":")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ModelLoadError(f"{spec}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    finally:
        sys.path.pop(0)
    function = getattr(module, func_name, None)
    if not callable(function):
        raise ModelLoadError(f"{spec}: {module_name} has no function {func_name}")
    return function


def _from_python(spec: str) -> Graph:
    from .capture import from_torch

    result = _import_function(spec)()
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ModelLoadError(f"{spec}: must return (torch_module, example_inputs)")
    model, example = result
    return from_torch(model, example)


def load_calibration(spec: str, graph: Graph, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None):
    """Calibration batches for ``graph`` as streamed :class:`~qcompiler.calibration.CalibrationSet`:
    from an ``.npz`` or a folder (:func:`load_data`), or from a data loader named
    ``package.module:function``: called once per sweep, it returns (or, as a generator, yields)
    batches as ``qcompiler.compile``'s ``calibration`` takes them."""
    from .calibration import calibration_set

    if not Path(spec).exists() and is_python_factory(spec):
        if mean is not None or std is not None:
            raise ModelLoadError(f"{spec}: --image-mean/--image-std normalize image folders; a data loader "
                                 f"returns batches ready to use")
        function = _import_function(spec)

        def batches():
            try:
                yield from function()
            except QCompilerError:
                raise
            except Exception as e:  # the user's loader failed: their error, said in one line
                raise ModelLoadError(f"{spec}: the data loader raised {type(e).__name__}: {e}") from None

        return calibration_set(graph, batches)
    return calibration_set(graph, load_data(spec, graph, mean, std))


def _assignments(items: Sequence[str], option: str, form: str, number: type) -> dict[str, list]:
    """``NAME=A,B,...`` items of a repeatable option, each list read with ``number``."""
    parsed: dict[str, list] = {}
    for item in items:
        name, sep, numbers = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            parsed[name] = [number(v) for v in numbers.split(",")]
        except ValueError:
            raise ModelLoadError(f"{option} {item!r}: expected {form}") from None
    return parsed


def parse_shapes(items: Sequence[str]) -> dict[str, list[int | tuple[int, int]]]:
    """``["x=1,3,224,224"]`` -> ``{"x": [1, 3, 224, 224]}``; a ``MIN:MAX`` dimension (the
    leading one: a dynamic batch; another: a dynamic sequence) becomes ``(MIN, MAX)``."""
    return _assignments(items, "--input-shape", "NAME=D0,D1,... (a dimension may be MIN:MAX)", _dimension)


def _dimension(text: str) -> int | tuple[int, int]:
    lo, sep, hi = text.partition(":")
    return (int(lo), int(hi)) if sep else int(text)


def is_dynamic(shapes: Mapping[str, Sequence[Any]]) -> bool:
    return any(isinstance(d, tuple) for shape in shapes.values() for d in shape)


def parse_values(items: Sequence[str]) -> dict[str, list[float]]:
    """``["shape=2,-1"]`` -> ``{"shape": [2.0, -1.0]}``: the importer casts them to the input's type."""
    return _assignments(items, "--input-value", "NAME=V0,V1,...", float)


def _fits(array_shape: tuple[int, ...], shape: tuple[int, ...], lengths: dict[int, tuple[int, int]]) -> bool:
    """``array_shape`` is ``shape``, except along the axes of ``lengths`` (axis -> (min, max)),
    where any size in the range fits."""
    if len(array_shape) != len(shape):
        return False
    return all(a == s or (i in lengths and lengths[i][0] <= a <= lengths[i][1])
               for i, (a, s) in enumerate(zip(array_shape, shape)))


def load_batches(path: str | os.PathLike, graph: Graph,
                 lengths: dict[int, dict[int, tuple[int, int]]] | None = None) -> list[list]:
    """Input batches for ``graph`` from an ``.npz`` (one array per input name; a file with one
    array serves a one-input graph). An array of the input's shape is one batch; one with an
    extra leading axis, or a leading axis that is a multiple of the batch size, is several.
    ``lengths``: input position -> {axis: (min, max)}, axes (a dynamic sequence's) whose size
    may be anything in the range instead of the graph's."""
    path = Path(path)
    with _open_npz(path) as data:
        files = [f for f in data.files if f != "labels"]
        if len(graph.inputs) == 1 and len(files) == 1:
            arrays = {graph.inputs[0].name: _array(data, files[0], path)}
        else:
            missing = [v.name for v in graph.inputs if v.name not in data.files]
            if missing:
                raise ModelLoadError(f"{path}: no array for input(s) {missing} (arrays: {files})")
            arrays = {v.name: _array(data, v.name, path) for v in graph.inputs}
    per_input = []
    for position, value in enumerate(graph.inputs):
        a, shape = arrays[value.name], value.shape
        free = (lengths or {}).get(position, {})
        if _fits(a.shape, shape, free):
            pieces = [a]
        elif _fits(a.shape[1:], shape, free):
            pieces = list(a)
        elif shape and _fits(a.shape[1:], shape[1:], {k - 1: r for k, r in free.items()}) and shape[0] \
                and a.shape[0] % shape[0] == 0:
            pieces = [a[i:i + shape[0]] for i in range(0, a.shape[0], shape[0])]
        else:
            spans = "".join(f"; axis {k} any of {lo}..{hi}" for k, (lo, hi) in sorted(free.items()))
            raise ModelLoadError(f"{path}: array '{value.name}' of shape {list(a.shape)} does not fit input "
                                 f"%{value.name} of shape {list(shape)} (one batch, or batches stacked on axis 0"
                                 f"{spans})")
        per_input.append(pieces)
    counts = {len(p) for p in per_input}
    if len(counts) != 1:
        raise ModelLoadError(f"{path}: inputs hold different numbers of batches {sorted(counts)}")
    if counts == {0}:
        raise ModelLoadError(f"{path}: holds no batch (its arrays are empty)")
    return [list(batch) for batch in zip(*per_input)]


def _open_npz(path: Path):
    import numpy as np

    if path.suffix != ".npz":
        raise ModelLoadError(f"{path}: expected an .npz of arrays")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ModelLoadError(f"{path}: cannot read data ({e})") from None


def _array(data, name: str, path: Path):
    """One array of an open ``.npz``; object (pickled) arrays and unreadable members are refused."""
    try:
        array = data[name]
    except (OSError, ValueError, EOFError) as e:  # ValueError: object arrays need pickle, refused here
        raise ModelLoadError(f"{path}: array '{name}' cannot be read ({e})") from None
    if array.dtype.kind not in "biuf":
        raise ModelLoadError(f"{path}: array '{name}' holds {array.dtype} values, not numbers")
    return array


def load_labels(path: str | os.PathLike, samples: int, classes: int):
    """Integer class ids, one per sample, each below ``classes``: anything else (one-hot rows,
    strings, floats, a count that does not match) is refused instead of scoring nonsense."""
    path = Path(path)
    with _open_npz(path) as data:
        if "labels" not in data.files:
            raise ModelLoadError(f"{path}: no 'labels' array (integer class ids, one per sample)")
        labels = _array(data, "labels", path)
    if labels.dtype.kind not in "iu" or labels.ndim != 1:
        raise ModelLoadError(f"{path}: 'labels' must be integer class ids of shape [samples], got "
                             f"{labels.dtype} {list(labels.shape)}")
    if len(labels) != samples:
        raise ModelLoadError(f"{path}: {len(labels)} labels for {samples} samples")
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise ModelLoadError(f"{path}: labels must be class ids in [0, {classes}) for a model with {classes} "
                             f"outputs per sample; found {labels.min()}..{labels.max()}")
    return labels


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def load_data(path: str | os.PathLike, graph: Graph, mean: Sequence[float] | None = None,
              std: Sequence[float] | None = None,
              lengths: dict[int, dict[int, tuple[int, int]]] | None = None) -> list[list]:
    """Batches from an ``.npz`` (see :func:`load_batches`) or, for a one-input model, a folder
    of ``.npy`` arrays or images. Images are read as RGB (or grayscale for one channel),
    resized to the input's H x W, scaled to [0, 1], then normalized by ``mean``/``std``;
    they are grouped into batches of the input's batch size."""
    import numpy as np

    path = Path(path)
    if path.is_file():
        if mean is not None or std is not None:
            raise ModelLoadError(f"{path}: --image-mean/--image-std normalize a folder of images, not arrays "
                                 f"(normalize the arrays before saving them)")
        return load_batches(path, graph, lengths)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: no such file or folder")
    if len(graph.inputs) != 1:
        raise ModelLoadError(f"{path}: a folder of arrays or images can feed a one-input model only; use an .npz")
    value = graph.inputs[0]
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES + (".npy",))
    if not files:
        raise ModelLoadError(f"{path}: no .npy or image files")
    samples = []
    for f in files:
        if f.suffix == ".npy":
            try:
                samples.append(np.load(f, allow_pickle=False))
            except (OSError, ValueError, EOFError) as e:
                raise ModelLoadError(f"{f}: cannot read array ({e})") from None
        else:
            samples.append(_read_image(f, value.shape, mean, std))
    arrays = np.concatenate([s if s.shape == value.shape else s[None] for s in samples]).astype(value.type.np_dtype)
    if arrays.shape[1:] != value.shape[1:]:
        raise ModelLoadError(f"{path}: samples of shape {list(arrays.shape[1:])} do not fit input %{value.name} "
                             f"{list(value.shape)}")
    batch = value.shape[0]
    usable = len(arrays) - len(arrays) % batch
    if usable == 0:
        raise ModelLoadError(f"{path}: {len(arrays)} samples, fewer than one batch of {batch}")
    return [[arrays[i:i + batch]] for i in range(0, usable, batch)]


def _read_image(path: Path, shape: Sequence[int], mean, std):
    import numpy as np
    from PIL import Image

    if len(shape) != 4:
        raise ModelLoadError(f"{path}: images need an NCHW input, the model takes {list(shape)}")
    channels, height, width = shape[1:]
    try:
        image = Image.open(path).convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read image ({e})") from None
    array = np.asarray(image, np.float32) / 255.0
    array = array[None] if channels == 1 else array.transpose(2, 0, 1)
    if mean is not None:
        array = array - np.asarray(mean, np.float32).reshape(-1, 1, 1)
    if std is not None:
        array = array / np.asarray(std, np.float32).reshape(-1, 1, 1)
    return array


def synthetic_batches(graph: Graph, count: int, seed: int = 0, val_range: tuple[float, float] = (0.0, 1.0)) -> list[list]:
    """``count`` batches of random inputs for ``graph`` (Polygraphy's synthetic data): floats
    uniform in ``val_range``, integers uniform over its whole numbers, booleans at random. For
    smoke builds and runs without data; accuracy measured on them means nothing."""
    import numpy as np

    low, high = val_range
    if not low <= high:
        raise ModelLoadError(f"--val-range {low},{high}: the low end is above the high end")
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        batch = []
        for v in graph.inputs:
            dtype = v.type.np_dtype
            if dtype.kind == "f":
                batch.append(rng.uniform(low, high, v.shape).astype(dtype))
            elif dtype.kind == "b":
                batch.append(rng.integers(0, 2, v.shape).astype(dtype))
            else:
                info = np.iinfo(dtype)
                lo, hi = max(int(np.ceil(low)), int(info.min)), min(int(np.floor(high)), int(info.max))
                batch.append(rng.integers(lo, hi + 1, v.shape).astype(dtype))
        batches.append(batch)
    return batches


def parse_val_range(text: str) -> tuple[float, float]:
    """``"-1,1"`` -> ``(-1.0, 1.0)``."""
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise ModelLoadError(f"--val-range {text!r}: expected LOW,HIGH (e.g. 0,1)") from None
    return low, high

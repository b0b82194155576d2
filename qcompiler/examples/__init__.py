"""Examples, apart from the compiler: demo models and offline data (``zoo``), the peer the demo
and benchmarks measure against (``peers``, ONNX Runtime's int8: the ``[bench]`` extra), and
``make demo`` (``python -m qcompiler.examples.demo``). Nothing in the compiler imports them."""

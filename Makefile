# Two commands: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: demo test corpus venv clean

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

test: $(STAMP)
	$(PY) -m pytest -q

# the real-model corpus (tests/models): published architectures, minutes each on two cores
corpus: $(STAMP)
	$(PY) -m pytest -q -m corpus tests/models

clean:
	rm -rf $(VENV) build *.egg-info

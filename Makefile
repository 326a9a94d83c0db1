# Two commands on a fresh machine with Python 3.11 and make:
#   make demo   create .venv from requirements.txt (if missing or stale), then run the demo
#   make test   the same venv plus requirements-dev.txt, then the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test venv clean-venv lint

# The stamp files make the venv "stale" whenever a requirements file is newer than the last install.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

# The whole two-stage pipeline on the demo data, on the CPU (about 10 minutes on 2 cores):
# stage 1 (DINO), stage 2 from the DINO teacher and, for comparison, from random initialisation.
demo: $(VENV)/.installed
	$(PY) -m dino_recog.data.demo --out data/demo
	mkdir -p output/demo
	$(PY) bench/color_histogram.py --root data/demo --json output/demo/histogram.json
	bash train.sh cpu 1 train_dino.py --config configs/demo/dino.yaml
	bash train.sh cpu 1 train_recog.py --config configs/demo/recog.yaml
	bash train.sh cpu 1 train_recog.py --config configs/demo/recog.yaml model.pretrained= \
		run.output_dir=output/demo/recog_scratch
	$(PY) -m dino_recog.report output/demo/dino output/demo/recog output/demo/recog_scratch \
		--extra output/demo/histogram.json

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check .

clean-venv:
	rm -rf $(VENV)

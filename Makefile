# Two commands on a fresh machine with Python 3.11 and make:
#   make demo   create .venv from requirements.txt (if missing or stale), then run the demo
#   make test   the same venv plus requirements-dev.txt, then the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= data/demo

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

demo: $(VENV)/.installed
	$(PY) -m dino_recog.data.demo --out $(DEMO_DIR)
	$(PY) bench/color_histogram.py --root $(DEMO_DIR)

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check .

clean-venv:
	rm -rf $(VENV)

# Two commands on a fresh machine with Python 3.11 and make:
#   make demo   create .venv from requirements.txt (if missing or stale), then run the demo
#   make test   the same venv plus requirements-dev.txt, then the test suite
#   make pictures   the pictures in pic/ (README) from the outputs of make demo
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast venv clean-venv lint pictures

# TORCH=cpu (make demo TORCH=cpu, make test TORCH=cpu): torch and torchvision at the pins of requirements.txt from
# PyTorch's CPU wheel index (about 0.7 GB in the venv instead of the CUDA build's 5.7 GB; pip on Linux takes the CUDA
# build by default). A venv made without it keeps its torch: `make clean-venv` first.
TORCH ?=
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_PINS = $(shell grep -oE '^torch(vision)?==[^ ]+' requirements.txt)
ifneq ($(filter-out cpu,$(TORCH)),)
$(error TORCH=$(TORCH): expected TORCH=cpu (the CPU-only build of torch) or nothing (pip's default build))
endif

# The stamp files make the venv "stale" whenever a requirements file is newer than the last install.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH),$(PY) -m pip install --quiet --index-url $(TORCH_CPU_INDEX) $(TORCH_PINS))
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

# The whole two-stage pipeline on the demo data, on the CPU (4 min 20 s on 2 idle cores, longer on shared ones:
# README, "What the demo shows"):
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

# The README's pictures, from the demo runs: attention of the DINO teacher on four query images (at their stored
# 128x64, a 16x8 patch grid), ranked lists of the fine-tuned model (8 queries from worst to best), curves of both stages.
# The same demo data and checkpoints give the same bytes. The ranked lists extract their features on one thread: the
# distances otherwise move in their last bits with the machine's core count (5e-7 measured, 1 vs 2 threads), which can
# swap two near-tied gallery images. Retraining (make demo) gives the same checkpoints only on the same kind of machine:
# train.sh runs nproc threads, and the training's floats depend on that number (see README, What the demo shows).
DEMO_QUERIES = $(sort $(wildcard data/demo/market/query/*.jpg))
ATTENTION_IMAGES = $(foreach i,1 40 80 120,$(word $(i),$(DEMO_QUERIES)))

pictures: $(VENV)/.installed
	@for f in output/demo/dino/teacher_backbone.pth output/demo/dino/log.jsonl output/demo/recog/model.pth \
		output/demo/recog/log.jsonl output/demo/recog_scratch/log.jsonl data/demo/market/query; do \
		test -e $$f || { echo "$$f is missing: run make demo first" >&2; exit 1; }; done
	mkdir -p pic output/pictures
	$(PY) -m dino_recog.visualize attention --checkpoint output/demo/dino/teacher_backbone.pth \
		--images $(ATTENTION_IMAGES) --size 128 64 --scale 2 --threshold 0.6 --out output/pictures/attention
	cp output/pictures/attention/attention.png pic/attention.png
	OMP_NUM_THREADS=1 $(PY) -m dino_recog.visualize ranks --config configs/demo/recog.yaml \
		--checkpoint output/demo/recog/model.pth --num-queries 8 --order even --out output/pictures/ranks
	cp output/pictures/ranks/ranks.png pic/ranks.png
	$(PY) -m dino_recog.visualize curves output/demo/dino --title "stage 1: DINO on the demo pool" \
		--out pic/curves_dino.png
	$(PY) -m dino_recog.visualize curves output/demo/recog output/demo/recog_scratch \
		--title "stage 2: from the DINO teacher (recog) vs from random initialisation (recog_scratch)" \
		--out pic/curves_recog.png

# The published fast-reid / torchreid code (pure-Python wheels, no dependencies) that tests and benchmarks compare with.
bench/.venv-ref/.installed: bench/ref_env.sh
	PYTHON=$(PYTHON) bash bench/ref_env.sh
	touch $@

# Every test (CI runs this). test-fast, for the edit loop, leaves out those marked slow: the learning tests, the
# multi-process, kill and restart runs, the commands run in a fresh interpreter and torch.compile.
# TEST_WORKERS pytest processes (pytest-xdist) share the tests: much of the suite waits on fresh interpreters' start-up
# (torchrun and its workers), which a second process overlaps with another test's computation, so 2 is faster than
# 1 even on 2 cores. TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
test: $(VENV)/.installed-dev bench/.venv-ref/.installed
	$(PY) -m pytest -q --durations=10 -n $(TEST_WORKERS)

test-fast: $(VENV)/.installed-dev bench/.venv-ref/.installed
	$(PY) -m pytest -q --durations=10 -n $(TEST_WORKERS) -m "not slow"

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check .

clean-venv:
	rm -rf $(VENV)

# Quick start: `make demo`, `make test`. Both create .venv (through constraints.txt) when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install demo test test-all bench bench-cifar bench-kd bench-distill bench-distill-speed bench-ranking bench-darts bench-tinyclip lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e '.[dev]'
	# CLIP's BPE vocabulary file (see src/vitnas/data/tokenizer.py): open_clip's package, without its torchvision
	$(PIP_INSTALL) --no-deps 'open-clip-torch>=2.20'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vitnas demo

# pytest exits 5 when it collected no test: treat that as the failure it is.
test: $(STAMP)
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "error: no tests were collected"; exit 1; fi; exit $$rc

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"; rc=$$?; if [ $$rc -eq 5 ]; then echo "error: no tests were collected"; exit 1; fi; exit $$rc

bench: $(STAMP)
	$(PY) benchmarks/supernet_step.py

# About an hour: a 30-minute CIFAR-10 supernet run, then the search benchmark on it (needs ../shared/data/cifar10).
bench-cifar: $(STAMP)
	$(PY) benchmarks/train_cifar.py --budget-min 30 --out runs/bench_train_cifar
	$(PY) benchmarks/search_cifar.py --checkpoint runs/bench_train_cifar/last.safetensors

# A few minutes: a digits teacher, then the same student from labels and distilled (3 seeds each).
bench-kd: $(STAMP)
	$(PY) benchmarks/distill_kd.py

# Under an hour on 2 cores (needs ../shared/data/cifar10): a CIFAR-10 teacher, its stored logits, students
# from labels vs from the store, and a Mini-DeiT from labels vs with MiniViT distillation.
bench-distill: $(STAMP)
	$(PY) benchmarks/distill_cifar.py --data ../shared/data/cifar10 --out runs/bench-distill

# About 7 minutes: step times alone / with a live teacher / from a store, and save-logits throughput.
bench-distill-speed: $(STAMP)
	$(PY) benchmarks/distill.py --images 256 --steps 5 --rounds 3 --batch-size 32

# About 75 minutes on 2 cores (needs ../shared/data/cifar10): supernet, 20 stratified archs trained alone,
# fine-tuned from inherited weights; Kendall tau / Spearman rho with bootstrap intervals. GPU: add --setting gpu --device cuda.
bench-ranking: $(STAMP)
	$(PY) benchmarks/ranking.py --data ../shared/data/cifar10 --out runs/bench-ranking

# About an hour on 2 cores (needs ../shared/data/cifar10): DARTS and CDARTS searches at equal budget, then
# their genotypes and a random one trained from scratch (2 seeds each); test top-1.
bench-darts: $(STAMP)
	$(PY) benchmarks/darts_cifar.py --per-class 400 --epochs 7 --retrain-epochs 5 --retrain-seeds 0 1 --threads 1 --out runs/bench-darts

# About an hour on 2 cores (needs ../shared/data/cifar10): a teacher CLIP on CIFAR-10 captions, then a
# half-size student by inheritance + affinity mimicking vs from scratch vs automatic inheritance (masks, 2
# progressive stages + fine-tune), and the auto arm's architecture from a random init (contrastive, and
# affinity mimicking) as controls; zero-shot test top-1 of all six.
bench-tinyclip: $(STAMP)
	$(PY) benchmarks/tinyclip_cifar.py --data-path ../shared/data/cifar10 --teacher-epochs 4 --student-epochs 2 --threads 1 --out runs/bench-tinyclip

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache

# mpq: `make setup`, `make demo`, `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mpq-installed
DEMO_DIR ?= workdirs/demo_cnn
DEMO_EPOCHS ?= 5

.PHONY: setup data demo test bench clean

setup: $(STAMP) data

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,deploy]'
	@touch $(STAMP)

data: $(STAMP)
	@$(PY) -m mpq.data.install --quiet

# The float CNN on a short schedule (5 epochs, no augmentation: about 5 minutes on 2 cores), its
# evaluation, then post-training W8A8 quantization of the checkpoint (calibrate + evaluate).
demo: setup
	$(PY) train.py --config=configs/fmnist_cnn.py --workdir=$(DEMO_DIR) \
	  --config.num_epochs=$(DEMO_EPOCHS) --config.warmup_steps=50 --config.augment=none \
	  --config.weight_decay=5e-4
	$(PY) eval.py --workdir=$(DEMO_DIR) --json=$(DEMO_DIR)/eval.json
	$(PY) eval.py --workdir=$(DEMO_DIR) --ptq --w_bits=8 --a_bits=8 --mode=int \
	  --export=$(DEMO_DIR)/int_w8a8 --json=$(DEMO_DIR)/eval_int_w8a8.json

test: setup
	@$(PY) -m pytest -x -n 2 --durations=12 tests

# All benchmarks (about 3 hours on 2 CPU cores from nothing; finished runs are reused), then the
# README tables from their JSON. integer.py uses the accuracy and mixed benchmarks' checkpoints.
bench: setup
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,deploy,bench]'
	$(PY) benchmarks/accuracy.py
	$(PY) benchmarks/mixed.py
	$(PY) benchmarks/integer.py
	$(PY) benchmarks/deploy.py
	$(PY) benchmarks/speed.py
	$(PY) benchmarks/litert_rules.py
	$(PY) benchmarks/ort_rules.py
	$(PY) benchmarks/report.py

clean:
	rm -rf workdirs .pytest_cache

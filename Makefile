# meli-categorizer: train → export → score.  `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch; on a GPU machine install a CUDA build of torch into the venv first
# (see README) and this pin is then already satisfied.
TORCH_VERSION ?= 2.13.0
EXTRAS ?= cpu,dev,spark
MODEL ?= mlp
CONFIG ?= $(MODEL)
DATA ?=
TRAIN_ARGS ?=
EXPERIMENT ?=
# make bench-train's earlier version: the last before training read its titles from shards
PREVIOUS ?= b130249
# make bench-train's seeds: 5 apart, so no two runs share an ensemble member
TRAIN_SEEDS ?= 0,5,10
OUTPUT ?= artifacts/model.onnx
INPUT ?= meli/resources/demo/catalog.jsonl.gz
SCORED ?= artifacts/scored.parquet
PYTEST_ARGS ?=
BENCH_ROWS ?= 2000000
BENCH_ARGS ?=

data_arg = $(if $(DATA),--data $(DATA))
exp_arg = $(if $(EXPERIMENT),--experiment $(EXPERIMENT))

.PHONY: help venv demo train export parity score test test-slow bench bench-accuracy bench-candidates bench-determinism bench-export bench-cluster bench-train-scale bench-train-epoch bench-train bench-categories bench-learning-curve bench-report data clean

help:
	@echo "make demo            venv + train + export + score on the embedded demo data"
	@echo "make test            run the test suite (what CI runs)"
	@echo "make test-slow       the catalog-sized test at 10,000,000 rows"
	@echo "make train           train (MODEL=mlp|cnn, CONFIG=..., DATA=folder, EXPERIMENT=name, TRAIN_ARGS=...)"
	@echo "make export          best run -> $(OUTPUT), with the parity check"
	@echo "make parity          re-check parity of $(OUTPUT) against its checkpoint"
	@echo "make score           score INPUT=... into SCORED=..."
	@echo "make bench           titles/s and peak RSS by stage, vs a fastText pipeline (BENCH_ROWS=...)"
	@echo "make bench-accuracy  this project's model vs classical baselines (DATA=folder)"
	@echo "make bench-candidates every candidate tried for a more accurate default, on one protocol (about 2.5 hours)"
	@echo "make bench-determinism  one title, one answer: $(OUTPUT) scored many ways (batch sizes, Spark, MLflow)"
	@echo "make bench-export    parity and calibration of $(OUTPUT), re-measured against its checkpoint"
	@echo "make bench-cluster   meli-score's engines on one dataset: local, local[2], standalone cluster, Spark Connect"
	@echo "make bench-train-scale  training time and peak RSS at 0.5M and 2M titles, vs fastText (about 1 hour)"
	@echo "make bench-train-epoch  one member's epoch vs fastText at 2M titles, three alternating pairs (about 10 minutes)"
	@echo "make bench-train     make train by an earlier version (PREVIOUS=rev) and this one, back to back, seeds TRAIN_SEEDS (DATA=folder)"
	@echo "make bench-categories  scoring speed at 1,588 categories (shared categories split), vs fastText"
	@echo "make bench-learning-curve  balanced accuracy at 5k/10k/20k/all training titles, vs fastText and TF-IDF + LinearSVC"
	@echo "make bench-report    the report's label-free accuracy estimate against the real accuracy (DATA=folder)"
	@echo "make data            download the course's MeLi 2019 data (SBW=1: also SBW vectors)"

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/meli-train --config $(CONFIG) --experiment meli-demo
	$(BIN)/meli-export --experiment meli-demo --output $(OUTPUT)
	$(BIN)/meli-score $(INPUT) $(SCORED) --model $(OUTPUT) --top-k 3
	$(BIN)/python -c "import pyarrow.parquet as pq; print(pq.read_table('$(SCORED)').slice(0, 8).to_pandas().to_string())"

train: venv
	$(BIN)/meli-train --config $(CONFIG) $(data_arg) $(exp_arg) $(TRAIN_ARGS)

export: venv
	$(BIN)/meli-export $(exp_arg) --output $(OUTPUT)

parity: venv
	$(BIN)/meli-export --check --output $(OUTPUT)

score: venv
	$(BIN)/meli-score $(INPUT) $(SCORED) --model $(OUTPUT)

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: venv
	MELI_SLOW_ROWS=10000000 $(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

bench: venv
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python bench/score_speed.py --model $(OUTPUT) --rows $(BENCH_ROWS) --write docs/results-speed.md $(BENCH_ARGS)

bench-accuracy: venv
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python bench/accuracy.py $(if $(DATA),--data $(DATA),--data ../shared/data/meli-es) --seeds 3 --write docs/results-accuracy.md $(BENCH_ARGS)

bench-candidates: venv
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python bench/candidates.py $(if $(DATA),--data $(DATA),--data ../shared/data/meli-es) --write docs/results-candidates.md $(BENCH_ARGS)

bench-determinism: venv
	$(BIN)/python bench/determinism.py --model "default=$(OUTPUT)" --write docs/results-determinism.md $(BENCH_ARGS)

bench-export: venv
	$(BIN)/python bench/export_figures.py --model "default=$(OUTPUT)" --write docs/results-export.md $(BENCH_ARGS)

bench-cluster: venv
	$(BIN)/python bench/cluster_speed.py --model $(OUTPUT) --rows 1000000 --write docs/results-cluster.md $(BENCH_ARGS)

bench-train-scale: venv
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python bench/train_scale.py --sizes 500000,2000000 --write docs/results-train-scale.md $(BENCH_ARGS)

bench-train-epoch: venv
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python bench/train_scale.py --sizes 2000000 --skip-recipe --repeats 3 --write docs/results-train-epoch.md $(BENCH_ARGS)

bench-categories: venv
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python bench/many_categories.py --rows 2000000 --write docs/results-categories.md $(BENCH_ARGS)

bench-train: venv
	$(BIN)/python bench/train_speed.py --previous $(PREVIOUS) --seeds $(TRAIN_SEEDS) $(if $(DATA),--data $(DATA),--data ../shared/data/meli-es) --write docs/results-train-speed.md $(BENCH_ARGS)

bench-learning-curve: venv
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python bench/learning_curve.py $(if $(DATA),--data $(DATA),--data ../shared/data/meli-es) --write docs/results-learning-curve.md $(BENCH_ARGS)

bench-report: venv
	$(BIN)/python bench/report_figures.py $(if $(DATA),--data $(DATA),--data ../shared/data/meli-es) --write docs/results-report.md $(BENCH_ARGS)

data: venv
	$(BIN)/python -m meli.train.download --dest data $(if $(SBW),--sbw)

clean:
	rm -rf artifacts mlruns mlflow.db .pytest_cache

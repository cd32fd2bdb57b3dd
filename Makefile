# One-Gen: `make demo` and `make test` each build .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/onegen datagen run pipelines/demo.yaml --output data/demo weights=random-tiny
	$(VENV)/bin/onegen datagen run pipelines/multiview.yaml --output data/demo stages.caption.enabled=false
	$(VENV)/bin/onegen datagen run pipelines/faceid.yaml --output data/demo stages.face.enabled=false stages.caption.enabled=false
	$(VENV)/bin/onegen datagen verify data/demo
	$(VENV)/bin/onegen train fit --config training/configs/demo.yaml
	@echo
	@echo "shards:        data/demo/<subset>/*.tar   (status: .venv/bin/onegen datagen status data/demo)"
	@echo "contact sheet: data/demo/_preview.png"
	@echo "run folder:    runs/onegen-demo/demo-<time>/   (checkpoints/, config.yaml, logs/fit.log, samples/)"
	@echo "sample:        .venv/bin/onegen sample --checkpoint runs/onegen-demo/<run>/checkpoints/<step>.ckpt --task text2image --out samples/"
	@echo "MLflow runs:   mlflow.db   (review: .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db)"

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -ra

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) bench/datagen_throughput.py
	$(PY) bench/labelers.py

clean:
	rm -rf data/demo runs mlflow.db mlflow.db.lock mlruns .pytest_cache

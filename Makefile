# The README's two commands. Both create .venv from scratch if needed (scripts/setup.sh is idempotent).
PY := .venv/bin/python
DEMO_OUT ?= out

.PHONY: demo test setup setup-test

setup:
	scripts/setup.sh

setup-test:
	scripts/setup.sh test,mindspore

# The main job on the embedded sample corpus: prepare 36 sub-datasets, train 6 of the 36 members
# (spread over the 6x6 grid; all 36 take ~30 min on 2 CPU cores), evaluate their ensemble.
DEMO_MEMBERS ?= 0,7,14,21,28,35
demo: setup
	$(PY) cli.py prepare --out $(DEMO_OUT)/sample-sub36 --split 36 --val-per-class 20 --shard-size 100
	$(PY) cli.py train --data $(DEMO_OUT)/sample-sub36 --shard $(DEMO_MEMBERS) --config sample --epochs 4 \
		--out $(DEMO_OUT)/runs --device cpu --resume
	$(PY) cli.py ensemble-eval --data $(DEMO_OUT)/sample-sub36 --runs $(DEMO_OUT)/runs --out $(DEMO_OUT)/report

# The whole test suite (CPU only), plus lint.
test: setup-test
	.venv/bin/ruff check .
	$(PY) -m pytest -q

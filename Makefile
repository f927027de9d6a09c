# The README's two commands. Both create .venv from scratch if needed (scripts/setup.sh is idempotent).
PY := .venv/bin/python
DEMO_OUT ?= out

.PHONY: demo test setup setup-test lint

setup:
	scripts/setup.sh

setup-test:
	scripts/setup.sh test

# The main job on the embedded sample corpus.
demo: setup
	$(PY) cli.py prepare --out $(DEMO_OUT)/sample-sub36 --val-per-class 10 --shard-size 100

# The whole test suite (CPU only), plus lint.
test: setup-test
	.venv/bin/ruff check .
	$(PY) -m pytest -q

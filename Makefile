# Two commands for a fresh machine: `make demo` and `make test`. Both create the virtual environment
# when it is missing and install the project with the tested versions from constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# DeepSpeed compiles a small C++ op on first use: cache it once per checkout.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
PYTEST_ARGS ?=

.PHONY: install test demo clean

install: $(STAMP)

# Re-runs pip only when the dependency declarations change; the package itself is editable.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

# Lint first (pyflakes, pycodestyle's errors, import order: [tool.ruff] in pyproject.toml): seconds, not minutes.
test: install
	$(PY) -m ruff check diffmic tests benchmarks
	$(PY) -m pytest $(PYTEST_ARGS)

# The whole path on the CPU: shard scikit-learn's digits, train DiffMIC, evaluate with 2 processes.
DEMO_STAMP := $(shell date +%Y%m%d-%H%M%S)
DEMO_RUN ?= runs/demo-$(DEMO_STAMP)
DEMO_SHARDS ?= shards/digits
DEMO_SET ?=
DEMO_SHARD_SET ?=
demo: install
	$(PY) -m diffmic shard --dataset digits --out $(DEMO_SHARDS) --overwrite $(DEMO_SHARD_SET)
	$(PY) -m diffmic train --config configs/digits.yaml --shards $(DEMO_SHARDS) --run-dir $(DEMO_RUN) $(DEMO_SET)
	$(PY) -m diffmic eval --run $(DEMO_RUN) --out $(DEMO_RUN)/eval/test --gpus 0 --tasks-per-node 2
	@echo "metrics: $(DEMO_RUN)/eval/test/metrics.json"
	@echo "figures: $(DEMO_RUN)/eval/test/confusion_matrix.png $(DEMO_RUN)/eval/test/trajectory.png"

FREE_PORT = $(shell $(PYTHON) -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

clean:
	rm -rf $(VENV) .pytest_cache .torch_extensions

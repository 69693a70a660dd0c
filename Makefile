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

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(PY) -m diffmic demo

clean:
	rm -rf $(VENV) .pytest_cache .torch_extensions

# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.kinema-installed
TORCH  ?= torch==2.13.0

.PHONY: demo test lint format setup clean chromium gpu-wheels

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

# The browser test drives Debian's Chromium with Playwright (no browser download).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

demo: $(STAMP)
	mkdir -p outputs
	$(VENV)/bin/kinema generate "a red circle moving right on a navy background" -o outputs/demo.mp4

test: $(STAMP) chromium
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(PY) -m pytest -q tests

# Wheels for benchmarks/gpu.sh on a lent GPU machine (Python 3.12 there): the reference
# diffusers and its one missing need, at the versions the tests here use.
GPU_WHEELS := diffusers importlib_metadata lazy-importer ftfy wcwidth
gpu-wheels: $(STAMP)
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl \
		$$($(PY) -c "import importlib.metadata as m; print(*(n + '==' + m.version(n) for n in '$(GPU_WHEELS)'.split()))")

lint:
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

clean:
	rm -rf $(VENV) outputs .pytest_cache

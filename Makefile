# Loom: two commands from a fresh clone -> `make demo`, `make test`.
PY ?= python3.11
VENV := .venv
VENV_LS := .venv-ls
STAMP := $(VENV)/.installed
STAMP_LS := $(VENV_LS)/.installed
STAMP_BROWSER := $(VENV)/.browser
LS_VERSION := 1.23.2

.PHONY: setup demo test test-unit test-integration test-e2e lint format bench bench-setup clean

setup: $(STAMP) $(STAMP_LS)

# Rebuilt only when the project's dependency list changes.
$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip setuptools wheel
	$(VENV)/bin/pip install -q -e ".[dev]"
	@touch $@

# Label Studio pins Django-era libraries that conflict with Prefect 3: it lives apart.
$(STAMP_LS):
	@test -x $(VENV_LS)/bin/python || $(PY) -m venv $(VENV_LS)
	$(VENV_LS)/bin/pip install -q --upgrade pip
	$(VENV_LS)/bin/pip install -q "label-studio==$(LS_VERSION)"
	@touch $@

# The real-browser test drives Debian's chromium + chromedriver (installed here when running as root, as CI does).
$(STAMP_BROWSER): $(STAMP)
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "the browser test needs Debian's chromium and chromium-driver:"; \
	    echo "  sudo apt-get install -y chromium chromium-driver"; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	fi
	@touch $@

demo: setup
	$(VENV)/bin/loom demo

test: setup $(STAMP_BROWSER)
	$(VENV)/bin/python -m pytest -q tests/unit
	$(VENV)/bin/python -m pytest -q tests/integration tests/e2e

test-unit: setup
	$(VENV)/bin/python -m pytest -q tests/unit

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup
	$(VENV)/bin/python -m app.bench

# anomalib, to compare the open_clip teacher with its WinCLIP (benchmarks/openclip_cost.py), in a venv of its
# own that also sees the project's packages (a relative .pth line): its [clip] extra pins an older open_clip.
VENV_BENCH := .venv-bench
bench-setup: $(STAMP)
	$(VENV)/bin/pip install -q -e ".[dev,bench]"
	@test -x $(VENV_BENCH)/bin/python || $(PY) -m venv $(VENV_BENCH)
	echo "../../../../$(VENV)/lib/python3.11/site-packages" > $(VENV_BENCH)/lib/python3.11/site-packages/loom-main-venv.pth
	$(VENV_BENCH)/bin/pip install -q "anomalib==2.7.0"

clean:
	rm -rf $(VENV) $(VENV_LS) $(VENV_BENCH) workspace

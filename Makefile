# The README's two commands: `make demo` (set up + run the main job) and `make test` (set up + tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= The three primary colors are
PYTEST_ARGS ?=
# Two workers, whole files each, in collection order; the real 270M exports one unit, first (tests/conftest.py).
XDIST ?= -n 2 --no-loadscope-reorder

.PHONY: setup demo test test-full test-fast lint

# torch goes first and pinned: here it takes the CPU wheel from disk; an unpinned torch pulls GBs of CUDA.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,executorch,litert,onnx]'
	touch $@

setup: $(BIN)/.installed

# System packages (Debian): chromium renders the HTML report in tests/test_report.py; the `pi` tests
# need qemu-user-static binfmt-support debootstrap. A no-op once all three tools are on PATH; not root
# (or apt failing) only prints what to install, and the tests that need them then say why.
SYSDEPS := chromium fonts-dejavu-core qemu-user-static binfmt-support debootstrap
CHROMIUM ?= chromium
.PHONY: sysdeps
sysdeps:
	@{ command -v $(CHROMIUM) && command -v qemu-aarch64-static && command -v debootstrap; } >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSDEPS)) \
	      || echo "sysdeps: apt-get failed: the chromium test will skip"; \
	  else echo "sysdeps: not root: run sudo apt-get install -y --no-install-recommends $(SYSDEPS)"; fi; }

demo: setup
	$(BIN)/edge generate --variant 270m --prompt "$(PROMPT)" --max-new-tokens 48

# CI: everything but the extra real exports marked `full` (they would push the run past 40 minutes).
test: setup sysdeps
	$(BIN)/ruff check edge tests
	$(BIN)/lint-imports
	$(BIN)/pytest -m "not full" $(XDIST) $(PYTEST_ARGS)

test-full: setup sysdeps
	$(BIN)/ruff check edge tests
	$(BIN)/lint-imports
	$(BIN)/pytest $(XDIST) $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/pytest -m "not slow and not pi" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check edge tests
	$(BIN)/ruff format --check edge tests
	$(BIN)/lint-imports

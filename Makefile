# Two commands a newcomer needs: `make demo` and `make test`. Both set up .venv themselves, offline-safe.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast test-slow bench clean ablation browser

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch from the wheel on disk first, so no dependency can pull a CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash jobs/demo.sh

# The ablation table (docs/ablation.md): 20 runs, about 20 min of CPU (43 min wall on the loaded 2-core machine), output in ./ablation.
ablation: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash jobs/ablation.sh

# CI: every test, the `slow` ones included (the embed, eval and SIGKILL jobs take most of the time).
test: $(STAMP) browser
	$(BIN)/python -m pytest -q tests

# The edit-test loop: everything but the tests marked `slow` (subprocesses, Ray jobs and clusters, SIGKILL,
# training runs, notebooks, the browser), under ~90 s on an idle 2-core machine.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

# tests/test_serve.py drives the web demo in Debian's headless chromium (through Playwright; never
# `playwright install`). Installed here when missing, as root or through sudo; instant when present.
CHROMIUM ?= $(or $(IMG_CHROMIUM),/usr/bin/chromium)
browser:
	@test -x "$(CHROMIUM)" || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; else \
	    echo "error: $(CHROMIUM) is missing and this is not root: run 'apt-get install -y chromium' as root" >&2; \
	    exit 1; fi; \
	  echo "installing Debian's chromium for the browser test (apt-get)"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; \
	  test -x "$(CHROMIUM)" || { echo "error: apt-get did not install $(CHROMIUM)" >&2; exit 1; }; }

test-slow: $(STAMP) browser
	$(BIN)/python -m pytest -q -m slow tests

clean:
	rm -rf demo out .img-cache

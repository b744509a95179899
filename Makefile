# One command each: `make run` starts the proxy on config/proxy.toml, `make test` runs the suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The browser tests (tests/e2e/test_browser_apps.py) need the real apps (pip's `apps` group),
# playwright-core (npm ci leaves the second file behind) and Debian's chromium (.ci/run).
APPS_STAMP    := $(VENV)/.apps-installed
BROWSER_STAMP := tests/browser/node_modules/.package-lock.json

.PHONY: run test fuzz bench bench-quick soak config-schema constraints clean

# setup.py builds proxy/_h2session*.c (HTTP/2 over the system's libnghttp2.so.14) in place
$(STAMP): pyproject.toml constraints.txt setup.py $(wildcard proxy/*.c proxy/*.h)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --constraint constraints.txt -e '.[test]'
	touch $(STAMP)

$(APPS_STAMP): $(STAMP)
	$(BIN)/pip install --quiet --constraint constraints.txt -e '.[apps]'
	touch $(APPS_STAMP)

$(BROWSER_STAMP): tests/browser/package.json tests/browser/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
	  cd tests/browser && npm ci --no-audit --no-fund --loglevel=error; \
	else \
	  echo "npm not found: the browser tests will be skipped (.ci/run installs npm)"; \
	fi

run: $(STAMP)
	$(BIN)/sandbox-proxy --config config/proxy.toml

test: $(STAMP) $(APPS_STAMP) $(BROWSER_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# config/proxy.schema.json from the typed config (proxy/config_schema.py); a test checks it is current
config-schema: $(STAMP)
	$(BIN)/python -m proxy.config_schema --output config/proxy.schema.json

# constraints.txt: pyproject.toml's runtime dependencies resolved afresh, every version pinned
constraints:
	rm -rf build/constraints-venv
	$(PYTHON) -m venv build/constraints-venv
	build/constraints-venv/bin/pip install --quiet --upgrade setuptools .
	{ grep '^#' constraints.txt; build/constraints-venv/bin/pip freeze --all \
	    --exclude sandbox-proxy --exclude pip --exclude wheel; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf build/constraints-venv

# The differential invariant suite (tests/e2e/test_invariants.py) and the HTTP/2 frame fuzzer
# (tests/e2e/test_http2_fuzz.py) with many more generated examples than `make test` runs;
# FUZZ_EXAMPLES=N to change how many.
FUZZ_EXAMPLES ?= 2000
fuzz: $(STAMP)
	SANDBOX_PROXY_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest tests/e2e/test_invariants.py \
	  tests/e2e/test_http2_fuzz.py -s $(PYTEST_ARGS)

# `make bench` (~15-20 min) writes benchmarks/results/; `make bench-quick` (~1 min) is the
# before/after check for hot-path changes. Extra flags: make bench BENCH_ARGS="--only ours,nginx"
bench: $(STAMP)
	$(BIN)/pip install --quiet --constraint constraints.txt -e '.[bench]'
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(BIN)/pip install --quiet --constraint constraints.txt -e '.[bench]'
	$(BIN)/python -m benchmarks.run --quick $(BENCH_ARGS)

# A bounded mixed workload (HTTP, SSE, WebSocket, uploads, errors); SOAK_ARGS="--duration 60"
soak: $(STAMP)
	$(BIN)/python -m benchmarks.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info tests/browser/node_modules

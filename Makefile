# mnemo: `make demo` runs the main job on the embedded default, `make test` passes the tests.
# Both install what they need first (into .venv) when it is missing or out of date.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Debian CJK fonts with many distinct designs: the demo's character stream is rendered from them.
CJK_FONTS := fonts-ipafont fonts-morisawa-bizud-gothic fonts-morisawa-bizud-mincho fonts-seto \
  fonts-kiloji fonts-kouzan-mouhitsu fonts-aoyagi-soseki fonts-aoyagi-kouzan-t fonts-yusei-magic \
  fonts-konatu fonts-dejima-mincho fonts-oradano-mincho-gsrr fonts-dotgothic16 fonts-train \
  fonts-reggae fonts-motoya-l-cedar fonts-motoya-l-maruberi fonts-vlgothic fonts-wqy-zenhei \
  fonts-sawarabi-mincho fonts-umeplus fonts-mplus

.PHONY: setup fonts browser demo test lint test-long test-e2e bench bench-query repro clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "mnemo needs Python 3.11, found " + sys.version' 
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==26.3
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	@$(MAKE) --no-print-directory fonts browser
	touch $(STAMP)

# Best effort: without apt (or without root) the demo falls back to matplotlib's fonts and says so.
fonts:
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -qq --no-install-recommends $(CJK_FONTS) >/dev/null 2>&1 \
	  || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends $(CJK_FONTS) >/dev/null 2>&1; } \
	  && echo "CJK fonts installed" \
	  || echo "CJK fonts not installed: the demo will use matplotlib's bundled fonts"; \
	else echo "apt-get not usable here: the demo will use matplotlib's bundled fonts"; fi

# Best effort: Debian's Chromium for the web page's browser tests (Playwright drives it through
# executable_path; Playwright's own browser download is not used). Without it those tests skip.
browser:
	@if command -v chromium >/dev/null 2>&1; then echo "Chromium found: $$(command -v chromium)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  { apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
	    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; }; } \
	  && echo "Chromium installed" || echo "Chromium not installed: the browser tests will skip"; \
	else echo "apt-get not usable here: the browser tests will skip unless chromium is on PATH"; fi

demo: setup
	$(BIN)/mnemo demo

# Lint, format and types first (seconds), then pytest. pytest exits 5 when it collects nothing: say so
# plainly; it still fails the run (and CI), since a suite that collects no test has lost its tests.
test: setup lint
	$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; fi; exit $$rc

# ruff (rules and line length in pyproject.toml) over everything; mypy over components/ and flows/.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Tests over a minute each (marked long, left out of `make test`): the 2-rank retrain through the flow.
# .ci/run runs them after `make test`.
test-long: setup
	$(BIN)/python -m pytest -m long; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no long tests"; fi; exit $$rc

# Real servers (tests/e2e): prefect server on SQLite and on PostgreSQL, mlflow server on PostgreSQL,
# and LanceDB + MLflow artifacts on S3 (moto's S3 server on 127.0.0.1, from the dev extra). Needs
# PostgreSQL on 127.0.0.1:5432 (user postgres, trust auth; the PostgreSQL and S3 tests skip without
# it; under CI they fail instead). .ci/run runs them after `make test` and `make test-long`.
test-e2e: setup
	$(BIN)/python -m pytest -m e2e tests/e2e

# The continual-learning benchmark (bench/continual.py): `make bench` is the full run (GPU when
# present), `make bench QUICK=1` the quick one (under 15 minutes on 2 CPU cores). Results go to bench/results/.
bench: setup
	$(BIN)/python -m bench.continual $(if $(QUICK),--quick)

# The query benchmark (bench/query.py) with its peer libraries (faiss, hnswlib).
bench-query: setup
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,bench]"
	$(BIN)/python -m bench.query --previous-default

# The same pipeline as DVC stages (dvc.yaml), with this environment's python on PATH.
repro: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# Removes the environment only: ./workspace holds models, data and the registry, delete it by hand.
clean:
	rm -rf $(VENV)

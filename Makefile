# The two set-up commands: `make run` (dashboard on 127.0.0.1) and `make test` (the whole suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8501
# Two test processes keep both cores busy while tests wait on worker subprocesses and servers.
TEST_WORKERS ?= 2
# DEV=1: reload on save, watching the app's sources only (never the venv or the run store under data/).
DEV ?=
DEV_FLAGS := $(if $(DEV),--server.fileWatcherType auto --server.runOnSave true --server.folderWatchBlacklist .venv --server.folderWatchBlacklist data,)

.PHONY: run test lint bench clean-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Reinstall only when requirements.txt or pyproject.toml changes. samlab itself is installed editable,
# so the dashboard, the tests and every worker process import it without PYTHONPATH.
$(STAMP): requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -r requirements.txt -e .
	touch $(STAMP)

# Bound to anything but loopback, the dashboard needs SAMLAB_PASSWORD: without it, one line says why and nothing starts.
run: $(STAMP)
	@$(BIN)/python -m dashboard.access --host $(HOST)
	$(BIN)/streamlit run app.py --server.address $(HOST) --server.port $(PORT) --browser.gatherUsageStats false $(DEV_FLAGS)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/step_cost.py

clean-venv:
	rm -rf $(VENV)

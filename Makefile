# The two commands a newcomer needs: `make run` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOC := PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(CURDIR)/$(PY) -m grpc_tools.protoc -Iserve/_proto=proto \
	--python_out=. --mypy_out=. --grpc_python_out=. --mypy_grpc_out=.

.PHONY: install run test test-cluster test-fast test-slow lint fmt typecheck proto proto-check bench bench-hostile docs docs-serve clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

run: install
	$(PY) examples/hello.py

# The Slurm cluster tests run too when Slurm is installed and we are root; else one line says so.
# The dashboard's browser test needs Debian's chromium and chromium-driver (installed as root);
# the HAProxy tests need Debian's haproxy and wrk (installed as root).
test: install
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || scripts/install_chromium.sh
	@scripts/install_haproxy.sh && scripts/install_wrk.sh
	$(PY) -m pytest -q -m "not slow" --ignore=tests/cluster
	@scripts/cluster_tests.sh $(PY)

# Installs Slurm and munge (Debian, root; services kept from auto-starting), then runs them.
test-cluster: install
	scripts/install_slurm.sh
	scripts/cluster_tests.sh $(PY)

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests/unit tests/component

test-slow: install
	$(PY) -m pytest -q -m slow --ignore=tests/cluster

lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

fmt: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: install
	$(VENV)/bin/mypy

TEST_PROTOC := PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(CURDIR)/$(PY) -m grpc_tools.protoc \
	-Itests/support=tests/support/protos --python_out=. --grpc_python_out=. --mypy_out=. \
	--mypy_grpc_out=.
EXAMPLE_PROTOC := $(CURDIR)/$(PY) -m grpc_tools.protoc -Iexamples=examples/protos \
	--python_out=. --grpc_python_out=.
# Ray's public gRPC API (RayServeAPIService), importable as serve.generated.serve_pb2.
API_PROTOC := PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(CURDIR)/$(PY) -m grpc_tools.protoc \
	-Iserve/generated=proto/api --python_out=. --mypy_out=. --grpc_python_out=. --mypy_grpc_out=.

proto: install
	$(PROTOC) proto/*.proto
	$(API_PROTOC) proto/api/*.proto
	$(TEST_PROTOC) tests/support/protos/*.proto
	$(EXAMPLE_PROTOC) examples/protos/*.proto

proto-check: install
	PROTOC='$(PROTOC)' API_PROTOC='$(API_PROTOC)' TEST_PROTOC='$(TEST_PROTOC)' \
		EXAMPLE_PROTOC='$(EXAMPLE_PROTOC)' scripts/check_proto.sh

# The peers (Ray Serve 2.60 and its HAProxy mode, LitServe, BentoML) go into .venv-peers/ once,
# from PyPI (about 1.5 minutes the first time); BENCH_ARGS=--no-peers leaves them out.
bench: install
	-scripts/install_wrk.sh
	$(if $(filter --no-peers --no-ingress --profile,$(BENCH_ARGS)),,scripts/bench_peers_setup.sh)
	$(PY) scripts/bench.py $(BENCH_ARGS)

# The proxy's front door under attack, with its default limits (figures for docs/benchmarks.md).
bench-hostile: install
	$(PY) scripts/bench_hostile.py $(BENCH_ARGS)

# The docs site (mkdocs.yml, docs/) into site/. --strict: a broken link, cross-reference or
# include fails the build, and so does reference drift (scripts/docs_hooks.py).
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# The same site, rebuilt on every change, at http://127.0.0.1:8001/.
docs-serve: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --strict --dev-addr 127.0.0.1:8001

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache site

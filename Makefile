# The two commands of the README quickstart: `make demo` and `make test`.
# Each creates (or reuses) .venv itself, with nothing but Python >= 3.11 on the machine.
SHELL := /bin/bash
VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo demo-resilience test lint typecheck unit soak bench bench-brokers bench-gateway dist clean venv

$(STAMP): pyproject.toml constraints.txt scripts/python.sh
	@test -x $(BIN)/python || "$$(scripts/python.sh)" -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/meshkit run examples/shop

demo-resilience: venv
	$(BIN)/python examples/resilience_demo.py

lint: venv
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/lint-imports

typecheck: venv
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest

test: lint typecheck
	scripts/ensure-services.sh
	scripts/install-etcd.sh >/dev/null
	scripts/install-browser.sh
	$(BIN)/pytest --cov=meshkit --cov-branch --cov-report=term:skip-covered
	scripts/test-native.sh

soak: venv
	MESHKIT_SOAK=1 $(BIN)/pytest -m slow

bench: venv
	$(BIN)/python benchmarks/resilience.py
	$(BIN)/python benchmarks/messaging.py

bench-gateway: venv
	scripts/install-bench-tools.sh
	$(BIN)/python benchmarks/gateway.py

bench-brokers: venv
	scripts/ensure-services.sh
	$(BIN)/python benchmarks/messaging.py --broker redis,nats,rabbitmq,kafka

# the release wheel: the gateway engine and the span recorder (and the W3C traceparent parser it calls) compiled with mypyc (needs a C compiler), for this platform and Python
dist: venv
	scripts/build-native.sh .native/site
	mkdir -p dist && cp .native/site-wheel/*.whl dist/
	@ls dist/*.whl

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage .native dist

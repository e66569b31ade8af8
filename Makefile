# The commands CI and people run. `make run` and `make test` do all the set-up themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install run test unit integration e2e redis envoy-config protos lint bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@# xds-protos ships an old copy of opentelemetry/proto/* over opentelemetry-proto's files; put
	@# the exporter's own version back (same version, its files win) or OTLP export cannot import.
	$(BIN)/python -m pip install -q --force-reinstall --no-deps "opentelemetry-proto==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

run: install                              ## the whole stack on this machine, until Ctrl-C
	$(BIN)/sidegate up --config examples/gateway.yaml

test: install redis                       ## the whole suite: unit, integration, e2e
	$(BIN)/python -m pytest

unit integration e2e: install redis
	$(BIN)/python -m pytest -m $@

redis:                                    ## the one system package the tests need
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else echo "redis-server is missing: install it with 'sudo apt-get install redis-server', then run make test again"; exit 1; fi; }

envoy-config: install                     ## regenerate the committed Envoy bootstraps
	$(BIN)/sidegate envoy-config --config examples/gateway.yaml --output envoy/gateway.yaml
	$(BIN)/sidegate envoy-config --config examples/gateway.yaml --listen-address 0.0.0.0 --output envoy/compose.yaml
	$(BIN)/sidegate envoy-config --config deploy/gateway.yaml --listen-address 0.0.0.0 --output deploy/envoy.yaml

lint: install
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

bench: install redis                      ## the quick load test (< 3 min): table here, results in .sidegate/bench
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/sidegate bench --quick

protos: install                           ## regenerate the committed stubs of protos/
	$(BIN)/python -m sidegate.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. \
	  protos/sidegate/admin/v1/keys.proto protos/sidegate/demo/v1/orders.proto

clean:
	rm -rf $(VENV) .sidegate .pytest_cache

# The commands CI and people run. `make run` and `make test` do all the set-up themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# uv installs the locked set (uv.lock). It lives in its own small venv, installed by pip from a
# hash-pinned requirements file, so nothing unpinned is fetched on the way.
UV     := .uv/bin/uv
STAMP  := $(VENV)/.installed-$(shell cat uv.lock requirements/uv.txt | cksum | cut -d' ' -f1)
# What the image installs: the runtime packages and setuptools (to build sidegate), with hashes.
EXPORT := $(UV) export --frozen --no-emit-project --no-default-groups --group build --no-header --quiet

.PHONY: install run test unit tools integration e2e compose redis envoy-config protos lint bench lock check-lock upgrade wheelhouse clean

$(UV): requirements/uv.txt
	@test -x .uv/bin/python || $(PYTHON) -m venv .uv
	.uv/bin/python -m pip install -q --disable-pip-version-check --require-hashes -r requirements/uv.txt
	@touch $@

# --locked: stop if pyproject.toml changed without `make lock`. Every extra goes in one venv.
$(STAMP): $(UV) pyproject.toml uv.lock
	$(UV) sync --locked --all-extras
	@# xds-protos ships an old copy of opentelemetry/proto/* over opentelemetry-proto's files; put
	@# the exporter's own files back (the same locked version) or OTLP export cannot import.
	$(UV) sync --locked --all-extras --reinstall-package opentelemetry-proto
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

run: install                              ## the whole stack on this machine, until Ctrl-C
	$(BIN)/sidegate up --config examples/gateway.yaml

test: install redis                       ## the whole suite: unit, integration, e2e
	$(BIN)/python -m pytest

unit tools integration e2e: install redis     ## one tier: its folder under tests/
	$(BIN)/python -m pytest tests/$@

compose: install redis
	$(BIN)/python -m pytest -m compose tests/e2e

redis:                                    ## the one system package the tests need
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else echo "redis-server is missing: install it with 'sudo apt-get install redis-server', then run make test again"; exit 1; fi; }

envoy-config: install                     ## regenerate the committed Envoy bootstraps
	$(BIN)/sidegate envoy-config --config examples/gateway.yaml --output envoy/gateway.yaml
	$(BIN)/sidegate envoy-config --config examples/gateway.yaml --listen-address 0.0.0.0 --socket-dir /run/sidegate --output envoy/compose.yaml
	$(BIN)/sidegate envoy-config --config deploy/gateway.yaml --listen-address 0.0.0.0 --output deploy/envoy.yaml
	$(BIN)/sidegate envoy-config --config deploy/tcp/gateway.yaml --listen-address 0.0.0.0 --output deploy/tcp/envoy.yaml

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

.PHONY: soak
soak: install redis                       ## the whole chain at a steady rate for 30 min (SOAK_MINUTES, SOAK_RATE): RSS and fds per process
	$(BIN)/python -m bench.soak --minutes $${SOAK_MINUTES:-30} --rate $${SOAK_RATE:-150}

.PHONY: fuzz
fuzz: install                             ## the fuzzers for ~10 min: frames on a socket, the sans-I/O core, the property tests (SIDEGATE_FUZZ_SECONDS, SIDEGATE_FUZZ_SEED)
	SIDEGATE_FUZZ_SECONDS=$${SIDEGATE_FUZZ_SECONDS:-600} $(BIN)/python -m pytest -s tests/integration/test_h2_fuzz.py
	SIDEGATE_CORE_FUZZ_SECONDS=$${SIDEGATE_FUZZ_SECONDS:-600} $(BIN)/python -m pytest -s tests/unit/test_h2_core_fuzz.py
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest tests/unit/test_xml.py tests/unit/test_translate.py

bench: install redis                      ## the quick load test (< 3 min): table here, results in .sidegate/bench
	$(BIN)/sidegate bench --quick

protos: install                           ## regenerate the committed stubs of protos/
	$(BIN)/python -m sidegate.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. \
	  protos/sidegate/admin/v1/keys.proto protos/sidegate/demo/v1/orders.proto

lock: $(UV)                               ## after editing pyproject.toml: pin what changed, keep the rest
	$(UV) lock
	$(EXPORT) --output-file requirements/image.txt
	$(UV) pip compile --quiet --universal --generate-hashes --no-header requirements/uv.in --output-file requirements/uv.txt

check-lock: $(UV)                         ## fail when pyproject.toml, uv.lock and requirements/ disagree
	$(UV) lock --check
	$(EXPORT) | diff -u requirements/image.txt - || { echo "requirements/image.txt is stale: run make lock"; exit 1; }
	$(UV) pip compile --quiet --universal --generate-hashes --no-header requirements/uv.in | diff -u requirements/uv.txt - \
	  || { echo "requirements/uv.txt is stale: run make lock"; exit 1; }

upgrade: $(UV)                            ## move every pin to the newest release pyproject allows
	$(UV) lock --upgrade
	$(MAKE) lock

# Run it on Linux with Python 3.11 and the image's CPU architecture: pip picks the wheels such a
# machine installs. The markers are dropped (sed) so that a package this Python skips and the
# image's may need (async-timeout below 3.11.3) is in the wheelhouse too.
wheelhouse:                               ## the image's wheels, for a build with no access to PyPI
	sed -E 's/ ; .* \\$$/ \\/' requirements/image.txt | $(PYTHON) -m pip download --quiet --require-hashes \
	  --no-deps --only-binary=:all: --dest wheelhouse -r /dev/stdin

clean:
	rm -rf $(VENV) .uv .sidegate .pytest_cache

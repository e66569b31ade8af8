# One image for the Python side of Sidegate: the three sidecars (authz, ratelimit, extproc), the
# demo upstream (`sidegate echo`) and the `sidegate` CLI. Envoy runs from its official image
# beside it: see docker-compose.yml. Settings come from SIDEGATE_* variables
# (sidegate/settings.py); policy from the gateway.yaml at $SIDEGATE_CONFIG. The example is built
# in so the image starts on its own; mount your own file over it.
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The locked set, by hash, into a virtual environment that the final stage copies: so neither
# the wheelhouse nor the sources stay in the image. requirements/image.txt is uv.lock's export
# (make lock), the packages the tests passed with. wheelhouse/ is empty unless `make wheelhouse`
# filled it; build with --build-arg PIP_NO_INDEX=1 to take every wheel from it and none from PyPI.
ARG PIP_NO_INDEX=0
WORKDIR /build
RUN python -m venv --without-pip /opt/sidegate
COPY requirements/image.txt ./
COPY wheelhouse/ /wheelhouse/
RUN pip --python /opt/sidegate/bin/python install --require-hashes --no-deps --find-links /wheelhouse -r image.txt \
    && awk '/^opentelemetry-proto==/ {p = 1; print; next} p && /^ / {print; next} {p = 0}' image.txt > otel.txt \
    && pip --python /opt/sidegate/bin/python install --require-hashes --no-deps --force-reinstall \
       --find-links /wheelhouse -r otel.txt
# xds-protos ships an old copy of opentelemetry/proto/*: the second install above puts
# opentelemetry-proto's own files back. Then sidegate itself, a regular (non-editable) install
# with the locked setuptools and no build isolation, so nothing unpinned is fetched.
COPY pyproject.toml README.md ./
COPY sidegate/ sidegate/
COPY authz/ authz/
COPY ratelimit/ ratelimit/
COPY extproc/ extproc/
RUN pip --python /opt/sidegate/bin/python install --no-deps --no-build-isolation --no-index . \
    && pip --python /opt/sidegate/bin/python check

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/sidegate/bin:$PATH
COPY --from=build /opt/sidegate /opt/sidegate

# A fixed numeric uid: Kubernetes' runAsNonRoot can verify it, and docker-compose.yml runs Envoy
# as the same uid so that it can read the development key this user writes with mode 0600.
# /state and /run/sidegate are owned by it: a volume mounted there starts with that owner.
# /run/sidegate holds the sidecars' Unix sockets (SIDEGATE_SOCKET_DIR): a volume there, shared
# with Envoy's container, is how Envoy reaches them. Nothing off the host can.
RUN groupadd --system --gid 10001 sidegate \
    && useradd --system --uid 10001 --gid 10001 --home-dir /state --shell /usr/sbin/nologin sidegate \
    && mkdir -p /state /etc/sidegate /run/sidegate \
    && chown 10001:10001 /state /run/sidegate \
    && chmod 0750 /run/sidegate
COPY examples/gateway.yaml /etc/sidegate/gateway.yaml

ENV SIDEGATE_CONFIG=/etc/sidegate/gateway.yaml \
    SIDEGATE_STATE_DIR=/state \
    SIDEGATE_SOCKET_DIR=/run/sidegate
WORKDIR /state
USER 10001:10001

# `sidegate serve` listens where gateway.yaml tells Envoy to find the sidecars: the built-in
# example's unix:sidecars.sock is /run/sidegate/sidecars-0.sock and sidecars-1.sock, one per
# worker. The probe (`sidegate health`, here by its light entry point, which imports no sidecar)
# reads the same settings and asks every worker socket for the gRPC health of every sidecar.
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-m", "sidegate.health", "--sidecars", "authz,ratelimit,extproc"]
CMD ["sidegate", "serve", "--sidecars", "authz,ratelimit,extproc"]

# syntax=docker/dockerfile:1
#
# replicate-gateway: build with `docker build -t replicate-gateway .`
#
# The project is installed in editable mode on purpose: app/db.py finds the Alembic
# migrations at <parent of the app package>/migrations, so the source tree
# (app/ and migrations/ side by side) must stay at /srv/gateway in the final image.

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: a virtual environment with the dependencies and the project ---------------
FROM ${PYTHON_IMAGE} AS build

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /srv/gateway

# Dependencies first (runtime only, no test extras), so this layer is cached until
# pyproject.toml changes.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# Then the project itself, editable, pointing at /srv/gateway/app.
COPY alembic.ini ./
COPY app/ ./app/
COPY migrations/ ./migrations/
RUN pip install --no-cache-dir --no-deps -e .

# --- runtime ----------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    GATEWAY_DATABASE_URL=sqlite:////srv/gateway/data/gateway.db

RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --home-dir /srv/gateway --no-create-home \
        --shell /usr/sbin/nologin gateway

WORKDIR /srv/gateway

# The venv and the source tree at the same paths as in the build stage (the editable
# install refers to /srv/gateway/app by absolute path). Both stay root-owned and read-only
# for the gateway user; only the data directory is writable.
COPY --from=build /opt/venv /opt/venv
COPY --from=build /srv/gateway /srv/gateway
RUN mkdir -p /srv/gateway/data \
 && chown gateway:gateway /srv/gateway/data \
 && chmod 0750 /srv/gateway/data

# For SQLite, keep the database across containers with a volume, e.g.
#   docker run -v gateway-data:/srv/gateway/data ...
# (a new named volume inherits the gateway ownership of this directory).

# Numeric, so runtimes that enforce runAsNonRoot can verify it (10001 = gateway).
USER 10001:10001

EXPOSE 8000

# `serve` applies pending migrations, then serves.
CMD ["replicate-gateway", "serve", "--host", "0.0.0.0", "--port", "8000"]

# The one image of every process (web, worker, history, beat, flower, migrate): the
# command picks the process (docker-compose.yml).  Two stages: the build stage makes a
# virtualenv from .ci/constraints.txt (the pins CI tests), the final stage copies it
# beside the source and runs as an unprivileged user.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
WORKDIR /src
# Dependencies first, from the metadata alone: a code change does not re-download them.
COPY setup.cfg pyproject.toml README.md ./
COPY .ci/constraints.txt .ci/constraints.txt
RUN mkdir shared web workers \
    && touch shared/__init__.py web/__init__.py workers/__init__.py \
    && /opt/venv/bin/pip install -c .ci/constraints.txt . \
    && /opt/venv/bin/pip uninstall -y shop
COPY shared shared
COPY web web
COPY workers workers
RUN /opt/venv/bin/pip install --no-deps -c .ci/constraints.txt .

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    APP_ENV=production \
    LOG_FORMAT=json
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /app --shell /usr/sbin/nologin shop
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# What runs from the source tree: gunicorn loads web/gunicorn_conf.py by path, alembic
# reads pyproject.toml and migrations/.
COPY --chown=root:root pyproject.toml ./
COPY --chown=root:root migrations migrations
COPY --chown=root:root shared shared
COPY --chown=root:root web web
COPY --chown=root:root workers workers
USER shop
EXPOSE 8000 5555 9100
CMD ["gunicorn", "-c", "web/gunicorn_conf.py", "web.wsgi:app", "--bind", "0.0.0.0:8000", \
     "--worker-class", "gevent", "--workers", "2", "--worker-connections", "10000"]

# syntax=docker/dockerfile:1
# subspectral on CPUs: `prepare` (Ray head, workers and driver), `train --device cpu`, `ensemble-eval`.
#
#   docker build -f docker/cpu.Dockerfile -t subspectral:cpu .          (from the repository root)
#   docker run --rm -v "$PWD/data:/data" subspectral:cpu prepare --out /data/sample-sub36
#
# The project is installed by scripts/setup.sh, the command README and CI run, with pyproject's pins
# (torch==2.14.1, torchvision==0.29.1, ray[data]==2.60.0), then pillow-simd built last. The build
# stage holds the compiler and headers; the final stage gets the finished venv and runtime libraries.

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# pillow-simd builds from source: a C compiler, libc headers, libjpeg-turbo and zlib headers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc=4:12.2.0-* libc6-dev=2.36-* \
       libjpeg62-turbo-dev=1:2.1.5-* zlib1g-dev=1:1.2.13.dfsg-* \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/subspectral
# Only what the install needs: the rest of the tree (tests, bench, .venv) never enters the image.
COPY pyproject.toml setup.py README.md cli.py ./
COPY scripts/setup.sh scripts/
COPY subspectral subspectral/
COPY pipeline pipeline/
COPY schemas schemas/
COPY train train/
# EXTRA: the pyproject extra to install ("cluster" adds ray[default]: dashboard and job API, which
# KubeRay's RayJob needs). TORCH_EXTRA_INDEX: empty installs exactly what CI installs (torch 2.14.1's
# default wheel, a CUDA build, ~6 GB); https://download.pytorch.org/whl/cpu installs the +cpu build of
# the same versions instead, a ~5 GB smaller image.
ARG EXTRA=cluster
ARG TORCH_EXTRA_INDEX=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN if [ -n "${TORCH_EXTRA_INDEX}" ]; then export PIP_EXTRA_INDEX_URL="${TORCH_EXTRA_INDEX}"; fi \
    && scripts/setup.sh "${EXTRA}" \
    && .venv/bin/python -c 'import PIL, sys; sys.exit(0 if ".post" in PIL.__version__ else "pillow-simd missing")' \
    && .venv/bin/python -c 'import subspectral.pipeline._splitjpeg' \
    && rm -rf .venv/lib/python3.11/site-packages/ray/tests

FROM ${PYTHON_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
LABEL org.opencontainers.image.title="subspectral-cpu" \
      org.opencontainers.image.description="spectral sub-dataset training: prepare, train (CPU), ensemble-eval"
# Runtime libraries only: libjpeg-turbo for pillow-simd; tini forwards SIGTERM to the CLI and reaps
# Ray's child processes; wget for KubeRay's default probes. profile.d: KubeRay runs `ray start` in a
# login shell, where Debian's /etc/profile resets PATH.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libjpeg62-turbo=1:2.1.5-* tini=0.19.0-* wget=1.21.3-* \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 1000 --create-home --shell /bin/bash subspectral \
    && echo "export PATH=/opt/subspectral/.venv/bin:\${PATH}" > /etc/profile.d/subspectral-venv.sh
# Same path as in the build stage: a venv (and the editable install) only works where it was made.
COPY --from=build /opt/subspectral /opt/subspectral
ENV PATH=/opt/subspectral/.venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    SUBSPECTRAL_CACHE=/home/subspectral/.cache/subspectral \
    RAY_USAGE_STATS_ENABLED=0
USER 1000:1000
WORKDIR /home/subspectral
ENTRYPOINT ["tini", "--", "python", "/opt/subspectral/cli.py"]
CMD ["--help"]

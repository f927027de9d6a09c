# syntax=docker/dockerfile:1
# subspectral on NVIDIA GPUs: `train --device cuda` (one member per container) and `ensemble-eval`.
#
#   docker build -f docker/cuda.Dockerfile -t subspectral:cuda .         (from the repository root)
#   docker run --rm --gpus all --shm-size 8g -v /shared/runs:/runs subspectral:cuda \
#       train --data s3://work/in21k-sub36 --shard 7 --config imagenet21k-sub36 --out /runs --resume --device cuda
#
# No CUDA base image is needed: torch 2.14.1's default wheel on PyPI is a CUDA build that carries its
# CUDA runtime, cuDNN and NCCL as pip packages; the host provides only the driver (NVIDIA Container
# Toolkit, or the GPU device plugin on Kubernetes). So this image installs exactly what CI installs,
# by the same command (scripts/setup.sh) with the same pins.

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# pillow-simd builds from source: a C compiler, libc headers, libjpeg-turbo and zlib headers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc=4:12.2.0-* libc6-dev=2.36-* \
       libjpeg62-turbo-dev=1:2.1.5-* zlib1g-dev=1:1.2.13.dfsg-* \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/subspectral
COPY pyproject.toml setup.py README.md cli.py ./
COPY scripts/setup.sh scripts/
COPY subspectral subspectral/
COPY pipeline pipeline/
COPY schemas schemas/
COPY train train/
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN scripts/setup.sh \
    && .venv/bin/python -c 'import PIL, sys; sys.exit(0 if ".post" in PIL.__version__ else "pillow-simd missing")' \
    && .venv/bin/python -c 'import subspectral.pipeline._splitjpeg' \
    && .venv/bin/python -c 'import torch, sys; sys.exit(0 if torch.version.cuda else "torch is not a CUDA build")' \
    && rm -rf .venv/lib/python3.11/site-packages/ray/tests

FROM ${PYTHON_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
LABEL org.opencontainers.image.title="subspectral-cuda" \
      org.opencontainers.image.description="spectral sub-dataset training: train and ensemble-eval on NVIDIA GPUs"
RUN apt-get update \
    && apt-get install -y --no-install-recommends libjpeg62-turbo=1:2.1.5-* tini=0.19.0-* \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 1000 --create-home --shell /bin/bash subspectral
COPY --from=build /opt/subspectral /opt/subspectral
# NVIDIA_*: what the NVIDIA container runtime mounts from the host (the driver's compute libraries).
ENV PATH=/opt/subspectral/.venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    SUBSPECTRAL_CACHE=/home/subspectral/.cache/subspectral \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 1000:1000
WORKDIR /home/subspectral
ENTRYPOINT ["tini", "--", "python", "/opt/subspectral/cli.py"]
CMD ["--help"]

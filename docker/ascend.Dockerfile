# syntax=docker/dockerfile:1
# subspectral on Huawei Ascend NPUs: `train --backend mindspore` (one member per container).
#
#   docker build -f docker/ascend.Dockerfile -t subspectral:ascend .     (from the repository root)
#   docker run --rm --device /dev/davinci0 --device /dev/davinci_manager --device /dev/devmm_svm \
#       --device /dev/hisi_hdc -v /usr/local/Ascend/driver:/usr/local/Ascend/driver:ro \
#       -v /shared/runs:/runs subspectral:ascend train --backend mindspore --data s3://work/in21k-sub36 \
#       --shard 7 --config imagenet21k-sub36 --out /runs --resume
#
# The base is a CANN image (the Ascend toolkit is not on PyPI); its CANN release must match the host's
# NPU driver and MindSpore 2.10's requirements: check both before changing CANN_IMAGE. The project is
# installed by scripts/setup.sh with the "mindspore" extra, the same command and pins as elsewhere
# (numpy<2: MindSpore 2.10's PYNATIVE mode needs it). The host mounts its driver at run time.

ARG CANN_IMAGE=swr.cn-south-1.myhuaweicloud.com/ascendhub/cann:8.5.0-910b-ubuntu22.04-py3.11

FROM ${CANN_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# pillow-simd builds from source (Ubuntu 22.04 package names and versions). CANN images build as root.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc=4:11.2.0-* libc6-dev=2.35-* \
       libjpeg-turbo8-dev=2.1.2-* zlib1g-dev=1:1.2.11.dfsg-* \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/subspectral
COPY pyproject.toml setup.py README.md cli.py ./
COPY scripts/setup.sh scripts/
COPY subspectral subspectral/
COPY pipeline pipeline/
COPY schemas schemas/
COPY train train/
ARG EXTRA=mindspore
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Fail the build, not the job, when the extra did not bring MindSpore in.
RUN scripts/setup.sh "${EXTRA}" \
    && .venv/bin/python -c 'import importlib.util as u, sys; sys.exit(0 if u.find_spec("mindspore") else "no mindspore")' \
    && .venv/bin/python -c 'import subspectral.pipeline._splitjpeg' \
    && rm -rf .venv/lib/python3.11/site-packages/ray/tests

FROM ${CANN_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
USER 0
LABEL org.opencontainers.image.title="subspectral-ascend" \
      org.opencontainers.image.description="spectral sub-dataset training: train on Ascend NPUs with MindSpore"
# The NPU device files belong to the host's HwHiAiUser group: the job user must be in a group with
# the same id (ASCEND_GID, 1000 on a default driver install) to open them.
ARG ASCEND_GID=1000
RUN apt-get update \
    && apt-get install -y --no-install-recommends libjpeg-turbo8=2.1.2-* tini=0.19.0-* \
    && rm -rf /var/lib/apt/lists/* \
    && (getent group HwHiAiUser || groupadd --gid "${ASCEND_GID}" HwHiAiUser) \
    && useradd --uid 1001 --gid HwHiAiUser --create-home --shell /bin/bash subspectral
COPY --from=build /opt/subspectral /opt/subspectral
ENV PATH=/opt/subspectral/.venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    SUBSPECTRAL_CACHE=/home/subspectral/.cache/subspectral
USER 1001
WORKDIR /home/subspectral
# CANN's set_env.sh exports the toolkit's library and operator paths; it has to be sourced, so a
# shell starts the CLI and then replaces itself with it (exec: SIGTERM still reaches Python).
ENTRYPOINT ["tini", "--", "bash", "-c", "source /usr/local/Ascend/ascend-toolkit/set_env.sh && exec python /opt/subspectral/cli.py \"$@\"", "cli.py"]
CMD ["--help"]

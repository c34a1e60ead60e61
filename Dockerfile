# syntax=docker/dockerfile:1
# FaceScale runtime image: Ray head/worker, job submitter and MLflow server of the k8s/ manifests all run it.
#
#   docker build -t registry.example.com/ml/facescale:0.1.0 .
#
# Versions come from requirements.txt only (the file `make setup` installs), so the image and a laptop run the
# same pins; the differences are the CUDA build of torch and a CUDA base. tests/test_dockerfile.py checks both.

# The CUDA major version here, the torch wheel index below and the DALI package in requirements.txt
# (nvidia-dali-cuda130) must agree: CUDA 13.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
# pyproject.toml: requires-python >=3.11,<3.12.
ARG PYTHON=python3.11

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

# Python 3.11 is not in Ubuntu 22.04's archive; the deadsnakes PPA builds it for this release. wget is used by
# KubeRay's default readiness/liveness probes of Ray pods.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates gpg-agent software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends ${PYTHON} ${PYTHON}-venv wget \
    && apt-get purge -y software-properties-common gpg-agent \
    && apt-get autoremove -y \
    && rm -rf /var/lib/apt/lists/* \
    && ${PYTHON} -m venv ${VIRTUAL_ENV}

# Non-root, numeric, so Kubernetes can verify runAsNonRoot; the same uid as the manifests' securityContext.
RUN groupadd --gid 1000 ray && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash ray

# The manifests set workingDir to this folder; relative paths in the RayJob entrypoint resolve here.
WORKDIR /home/ray/facescale

# Dependencies first (a layer that changes only with requirements.txt). torch goes in alone from the CUDA index,
# at the version requirements.txt pins, as `make setup` does; the CUDA wheel (2.x.y+cu130) then satisfies the
# `torch==` pin when the rest of requirements.txt is installed from PyPI.
# DeepSpeed ops: DS_BUILD_OPS=0 compiles none at install, and none is compiled at run time either, so this
# -runtime base (no nvcc, no C++ compiler) suffices: FaceScale hands DeepSpeed a torch SGD (no FusedAdam/CPUAdam
# builder), ZeRO stages 0-3 in fp32/bf16/fp16 without offload or quantization run on torch collectives, on CUDA
# the comm backend finds no ShareMemCommBuilder to build, and on the CPU engine_deepspeed.py skips that build.
# An override of train.deepspeed that needs an op (zero_quantized_* -> QuantizerBuilder, NVMe offload ->
# AsyncIOBuilder, a DeepSpeed optimizer) would JIT-build it and fail here: use a -devel base with DS_BUILD_<OP>=1.
COPY requirements.txt ./
RUN pip install --index-url "${TORCH_INDEX_URL}" "$(grep -E '^torch==' requirements.txt)" \
    && DS_BUILD_OPS=0 pip install -r requirements.txt \
    && python -c "import torch; assert (torch.version.cuda or '').startswith('13'), torch.version.cuda"

# The project itself, without touching the pinned dependencies.
COPY pyproject.toml README.md ./
COPY platform/ platform/
RUN pip install --no-deps . && python -c "import facescale, nvidia.dali"

# What the jobs read at run time: entry points, pipeline specs, configs.
COPY jobs/ jobs/
COPY pipelines/ pipelines/
COPY configs/ configs/
# The code stays root-owned (read-only to the job); the folder itself is writable for local outputs.
RUN chown 1000:1000 /home/ray/facescale

USER 1000:1000
ENV HOME=/home/ray

# KubeRay and the MLflow Deployment set their own command; run bare, the image prints the CLI's usage.
CMD ["facescale", "--help"]

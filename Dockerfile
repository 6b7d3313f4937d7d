# syntax=docker/dockerfile:1
# recserve images. Targets:
#   cpu          slim Python + onnxruntime, the exported model at /models/$MODEL_NAME (the default target)
#   gpu          NVIDIA CUDA + cuDNN runtime + onnxruntime-gpu, with the same model
#   cpu-runtime  the cpu image without a model: mount a model repository at /models/$MODEL_NAME
#   gpu-runtime  the gpu image without a model, likewise
#   export       the export toolchain (CPU torch) that builds the model; never shipped
#
#   docker build --target gpu -t recserve:gpu .
#   docker build --target cpu --build-arg CHECKPOINT=checkpoints/my-encoder --build-arg MODEL_NAME=my-enc .
#   docker run --read-only --tmpfs /tmp -p 50051:50051 -p 8000:8000 recserve:cpu
#
# The runtime stages install through deploy/install-runtime.sh, which tests/test_image.py runs into a fresh
# virtual environment and serves from. docs/deploy.md#images has the sizes and the run options.

# ---- The versions, in one place ----------------------------------------------------------------------------
# Python packages are pinned in constraints.txt (onnxruntime 1.32.0, onnxruntime-gpu 1.31.1, torch 2.13.0).
# NOTE: base images are pinned by exact version tags. Append each one's digest (@sha256:...) from the
# registry where you have access: none could be looked up where this file was written.
ARG PYTHON_IMAGE=python:3.12.13-slim-bookworm
# onnxruntime-gpu 1.31.1 from PyPI is built for CUDA 13.0 and cuDNN 9: the wheel's build_and_package_info
# says cuda_version 13.0, its `cuda` and `cudnn` extras require nvidia-cuda-runtime~=13.0 and
# nvidia-cudnn-cu13~=9.0, and its CUDA provider links libcudart.so.13 and libcublas.so.13. ONNX Runtime's
# CUDA execution provider requirements page: a build for CUDA X.y runs on any CUDA X runtime (minor-version
# compatibility), and its cuDNN major must match (8.x and 9.x are not interchangeable). This base has CUDA
# 13.0.1 and cuDNN 9, and needs an NVIDIA driver of the R580 branch or newer on the host.
# deploy/install-runtime.sh fails the build when the two do not match.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
# The CPU build of torch (PyPI's Linux wheel is the CUDA one, gigabytes of libraries); the export stage only.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The model baked into `cpu` and `gpu`: the packaged all-MiniLM-L6-v2, or CHECKPOINT, a checkpoint
# directory inside the build context (put it under checkpoints/, which .dockerignore lets in).
ARG MODEL_NAME=all-MiniLM-L6-v2
ARG CHECKPOINT=
ARG APP_UID=10001

# ---- export: checkpoint -> model repository at /models/$MODEL_NAME -----------------------------------------
FROM ${PYTHON_IMAGE} AS export
ARG TORCH_INDEX_URL
ARG MODEL_NAME
ARG CHECKPOINT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
WORKDIR /build
COPY pyproject.toml README.md constraints.txt ./
COPY recserve ./recserve
# torch first, from the CPU index, at the version constraints.txt pins; then recserve and the exporter.
RUN python -m venv /opt/export \
    && /opt/export/bin/pip install --index-url "${TORCH_INDEX_URL}" --constraint constraints.txt torch \
    && /opt/export/bin/pip install --constraint constraints.txt ".[cpu,export]"
RUN --mount=type=bind,target=/context \
    /opt/export/bin/recserve export --out "/models/${MODEL_NAME}" \
        ${CHECKPOINT:+--model "/context/${CHECKPOINT}"}

# ---- cpu-runtime: what `recserve serve` needs on a CPU, and nothing else -----------------------------------
FROM ${PYTHON_IMAGE} AS cpu-runtime
ARG MODEL_NAME
ARG APP_UID
# The context is bound read-write so that pip can build recserve in it; what it writes there is dropped.
RUN --mount=type=bind,target=/src,rw \
    python -m venv /opt/recserve \
    && PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
        sh /src/deploy/install-runtime.sh cpu /opt/recserve/bin/python /src \
    && /opt/recserve/bin/python -m pip uninstall --yes --quiet pip \
    && groupadd --system --gid "${APP_UID}" recserve \
    && useradd --system --no-log-init --uid "${APP_UID}" --gid "${APP_UID}" --home-dir /tmp \
        --shell /usr/sbin/nologin recserve
# Read-only root friendly: HOME and TMPDIR are the /tmp volume, bytecode was compiled at install time.
ENV PATH=/opt/recserve/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    RECSERVE_MODEL_REPO=/models/${MODEL_NAME} \
    RECSERVE_HOST=0.0.0.0 \
    RECSERVE_PORT=50051 \
    RECSERVE_METRICS_HOST=0.0.0.0 \
    RECSERVE_METRICS_PORT=8000
WORKDIR /tmp
VOLUME ["/tmp"]
USER ${APP_UID}:${APP_UID}
EXPOSE 50051 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "recserve.health"]
# exec form: the server is PID 1 and gets SIGTERM itself (it handles it: NOT_SERVING, drain, exit 0).
ENTRYPOINT ["recserve", "serve"]

# ---- gpu-runtime: the same on CUDA -------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu-runtime
ARG MODEL_NAME
ARG APP_UID
# NOTE: Ubuntu's python3 (3.12) is pinned by the base image tag; its own package versions change with security
# updates, so they are not pinned here.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN --mount=type=bind,target=/src,rw \
    python3 -m venv /opt/recserve \
    && PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
        sh /src/deploy/install-runtime.sh gpu /opt/recserve/bin/python /src \
    && /opt/recserve/bin/python -m pip uninstall --yes --quiet pip \
    && groupadd --system --gid "${APP_UID}" recserve \
    && useradd --system --no-log-init --uid "${APP_UID}" --gid "${APP_UID}" --home-dir /tmp \
        --shell /usr/sbin/nologin recserve
ENV PATH=/opt/recserve/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    RECSERVE_MODEL_REPO=/models/${MODEL_NAME} \
    RECSERVE_HOST=0.0.0.0 \
    RECSERVE_PORT=50051 \
    RECSERVE_METRICS_HOST=0.0.0.0 \
    RECSERVE_METRICS_PORT=8000
WORKDIR /tmp
VOLUME ["/tmp"]
USER ${APP_UID}:${APP_UID}
EXPOSE 50051 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "recserve.health"]
ENTRYPOINT ["recserve", "serve"]

# ---- the shipped images: a runtime with the exported model baked in ----------------------------------------
FROM gpu-runtime AS gpu
COPY --from=export /models /models

FROM cpu-runtime AS cpu
COPY --from=export /models /models

# syntax=docker/dockerfile:1
#
# dfmod container images. One image serves every role (the command picks it):
#   dfmod api --host 0.0.0.0 --port 8000   (default CMD)
#   dfmod worker
#   dfmod migrate
#
# Targets:
#   cpu  (default)  API, migrations, helm test and CPU workers  docker build --target cpu  -t dfmod:0.1.0 .
#   cuda            GPU workers (torch with its CUDA libraries)  docker build --target cuda -t dfmod:0.1.0-cuda .
# The CUDA image needs only the NVIDIA driver on the host (NVIDIA container toolkit / GPU operator); PyPI's torch
# 2.14 wheels are CUDA 13.0 builds, which need driver R580 or newer (see TORCH_CUDA_INDEX_URL for older drivers).
# Sizes (buildah, 2026-12-02; docs/operations.md): cpu 789 MB (no torch), cuda 6.32 GB, uncompressed.
#
# What each image holds is the project's dependencies plus the extras named by CPU_EXTRAS / GPU_EXTRAS.
# torch comes only with the dependencies that ask for it: from the CPU wheel index for `cpu`, from PyPI
# (CUDA builds) for `cuda`. The base install serves on onnxruntime/OpenVINO without torch, so the `cpu` image,
# and so the API, carries no torch at all.
#
# Layers, cheapest to rebuild last: torch (only pyproject.toml and the build args invalidate it), the other
# dependencies (pyproject.toml), then the sources (`pip install . --no-deps`): a code change rebuilds only that.
#
# Pinned: the base image to a Python patch release (add `@sha256:...` through PYTHON_IMAGE to pin it by
# digest), and torch to the range the test suite runs (TORCH_CONSTRAINTS).

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---------------------------------------------------------------------------------------------------
# Build stages: a virtual environment in /opt/venv, copied whole into the runtime stages.
FROM ${PYTHON_IMAGE} AS venv
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# The torch range the project is tested with; a new torch is a deliberate change of this line.
ARG TORCH_CONSTRAINTS="torch>=2.4,<2.15 torchvision>=0.19,<0.30"
RUN python -m venv /opt/venv
WORKDIR /src
COPY docker/requirements.py pyproject.toml ./
RUN printf '%s\n' ${TORCH_CONSTRAINTS} > /src/torch-constraints.txt

FROM venv AS build-cpu
# Extras for the CPU image, comma-separated; `openvino` brings the fastest accepted CPU backend
# (openvino-int8, see the model card). Empty: the base install (onnxruntime), torch-free either way.
ARG CPU_EXTRAS="openvino"
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python requirements.py --extras "${CPU_EXTRAS}" --only torch > torch.txt \
 && if [ -s torch.txt ]; then \
      pip install --index-url "${TORCH_CPU_INDEX_URL}" -c torch-constraints.txt -r torch.txt; \
    fi
RUN python requirements.py --extras "${CPU_EXTRAS}" --exclude torch > requirements.txt \
 && pip install -c torch-constraints.txt -r requirements.txt
COPY . .
RUN pip install . --no-deps \
 && python -c "import dfmod, pathlib, sys; sys.exit(not list(pathlib.Path(dfmod.__file__).parent.glob('models/*.safetensors')))"

FROM venv AS build-cuda
# Extras for the CUDA image: `gpu` brings torch (PyPI's Linux x86_64 wheels bring their CUDA/cuDNN libraries as
# wheels: torch 2.14 is a CUDA 13.0 build, driver R580+). For nodes with an older driver, take a CUDA 12 build:
#   --build-arg TORCH_CUDA_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG GPU_EXTRAS="gpu"
ARG TORCH_CUDA_INDEX_URL=https://pypi.org/simple
RUN python requirements.py --extras "${GPU_EXTRAS}" --only torch > torch.txt \
 && if [ -s torch.txt ]; then \
      pip install --index-url "${TORCH_CUDA_INDEX_URL}" -c torch-constraints.txt -r torch.txt; \
    fi
RUN python requirements.py --extras "${GPU_EXTRAS}" --exclude torch > requirements.txt \
 && pip install -c torch-constraints.txt -r requirements.txt
COPY . .
RUN pip install . --no-deps \
 && python -c "import dfmod, pathlib, sys; sys.exit(not list(pathlib.Path(dfmod.__file__).parent.glob('models/*.safetensors')))" \
 && python -c "import torch"

# ---------------------------------------------------------------------------------------------------
# Runtime: no compilers, no pip cache, no sources; a non-root user (uid/gid 10001).
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/dfmod \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    DFMOD_DATA_DIR=/var/lib/dfmod
RUN groupadd --system --gid 10001 dfmod \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/dfmod --shell /usr/sbin/nologin dfmod \
 && install -d -o 10001 -g 10001 /home/dfmod /var/lib/dfmod
COPY docker/healthcheck.py /usr/local/lib/dfmod/healthcheck.py
WORKDIR /home/dfmod
USER 10001:10001
EXPOSE 8000 9100
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "/usr/local/lib/dfmod/healthcheck.py"]
# Exec form: `dfmod` is PID 1 and receives SIGTERM itself (uvicorn graceful stop, Celery warm shutdown).
ENTRYPOINT ["dfmod"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]

FROM runtime AS cuda
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    DFMOD_DEVICE=cuda \
    DFMOD_BATCH_SIZE=256
COPY --from=build-cuda /opt/venv /opt/venv
CMD ["worker"]

# Last stage = the default target.
FROM runtime AS cpu
COPY --from=build-cpu /opt/venv /opt/venv

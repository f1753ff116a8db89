# syntax=docker/dockerfile:1
#
# dfmod container images. One image serves every role (the command picks it):
#   dfmod api --host 0.0.0.0 --port 8000   (default CMD)
#   dfmod worker
#   dfmod migrate
#
# Targets:
#   cpu  (default)  torch from the CPU wheel index        docker build --target cpu  -t dfmod:0.1.0 .
#   cuda            torch with bundled CUDA 12 libraries  docker build --target cuda -t dfmod:0.1.0-cuda .
# The CUDA image needs only the NVIDIA driver on the host (NVIDIA container toolkit / GPU operator).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------
# Build stages: a virtual environment in /opt/venv, copied whole into the runtime stages.
FROM ${PYTHON_IMAGE} AS venv
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

FROM venv AS build-cpu
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
# torch first (the big, rarely changing layer); `pip install .` then finds it satisfied.
RUN pip install --index-url "${TORCH_CPU_INDEX_URL}" "torch>=2.4" "torchvision>=0.19"
WORKDIR /src
COPY . .
RUN pip install . \
 && python -c "import dfmod, pathlib, sys; sys.exit(not list(pathlib.Path(dfmod.__file__).parent.glob('models/*.safetensors')))"

FROM venv AS build-cuda
# PyPI's Linux x86_64 torch wheels are CUDA 12 builds that bring their CUDA/cuDNN libraries as wheels.
ARG TORCH_CUDA_INDEX_URL=https://pypi.org/simple
RUN pip install --index-url "${TORCH_CUDA_INDEX_URL}" "torch>=2.4" "torchvision>=0.19"
WORKDIR /src
COPY . .
RUN pip install . \
 && python -c "import dfmod, pathlib, sys; sys.exit(not list(pathlib.Path(dfmod.__file__).parent.glob('models/*.safetensors')))"

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

# lowbit: API server and Celery workers in one image.
#
#   docker build -t lowbit .                                   # CPU build (default)
#   docker build -t lowbit:gpu --build-arg TORCH_VARIANT=cu130 .   # CUDA build
#
# TORCH_VARIANT names a PyTorch wheel index (https://download.pytorch.org/whl/<variant>):
# "cpu", or a CUDA variant that publishes torch 2.13.0. For any variant other than "cpu" the CPU
# onnxruntime is swapped for onnxruntime-gpu ONNXRUNTIME_GPU. The two must agree on the CUDA major
# version: onnxruntime-gpu 1.31.1 from PyPI links CUDA 13 (libcublas.so.13, libcudart.so.13), which
# torch's cu130 wheels install; the build fails below if a library it links is missing.
FROM python:3.11-slim

ARG TORCH_VARIANT=cpu
ARG ONNXRUNTIME_GPU=1.31.1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from the index of the chosen variant: installing the project from PyPI alone
# would pull PyPI's default (CUDA) torch build. Must match the pin in pyproject.toml; the local
# version label (2.13.0+cpu, 2.13.0+cu130) still satisfies "torch==2.13.0" there.
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==2.13.0"

WORKDIR /tmp/lowbit-src
COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
RUN pip install . \
    && cd / \
    && rm -rf /tmp/lowbit-src

# GPU variants: ONNX Runtime's CUDA build (onnxruntime-gpu releases lag the CPU package, so its
# version is its own argument). ONNX Runtime dlopen()s the CUDA/cuDNN libraries at session
# creation; the worker never imports torch, so nothing preloads the copies that torch's nvidia-*
# wheels installed. Register their lib folders with the dynamic loader, then check that every
# library the CUDA provider links resolves (all but the driver's libcuda, which the GPU host mounts):
# a CUDA major-version mismatch would otherwise only show as jobs silently running on the CPU.
RUN set -eux; \
    if [ "${TORCH_VARIANT}" != "cpu" ]; then \
        pip uninstall -y onnxruntime; \
        pip install "onnxruntime-gpu==${ONNXRUNTIME_GPU}"; \
        python -c 'import glob, site; print("\n".join(sorted(d for sp in site.getsitepackages() for d in glob.glob(sp + "/nvidia/**/lib", recursive=True))))' \
            > /etc/ld.so.conf.d/zz-python-nvidia.conf; \
        cat /etc/ld.so.conf.d/zz-python-nvidia.conf; \
        ldconfig; \
        python -c 'import onnxruntime as ort; p = ort.get_available_providers(); print(ort.__version__, p); assert "CUDAExecutionProvider" in p, p'; \
        cuda_ep="$(python -c 'import onnxruntime, pathlib; print(next(pathlib.Path(onnxruntime.__file__).parent.glob("capi/libonnxruntime_providers_cuda.so")))')"; \
        missing="$(ldd "${cuda_ep}" | grep 'not found' | grep -v 'libcuda\.so' || true)"; \
        if [ -n "${missing}" ]; then echo "onnxruntime-gpu ${ONNXRUNTIME_GPU} needs: ${missing}"; exit 1; fi; \
    fi

# Unprivileged runtime user. Fixed uid/gid so the CPU and GPU images can share one data volume.
RUN groupadd --system --gid 10001 lowbit \
    && useradd --system --uid 10001 --gid lowbit --home-dir /srv --shell /usr/sbin/nologin lowbit \
    && mkdir -p /srv /data \
    && chown lowbit:lowbit /srv /data

WORKDIR /srv
ENV LOWBIT_DATA_DIR=/data
# Declared after the chown: a fresh named volume is initialised from this folder, ownership included.
VOLUME /data
EXPOSE 8000
USER lowbit

# Liveness of the API process. Worker containers run no HTTP server: disable or override it there.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LOWBIT_PORT', '8000'), timeout=4)" || exit 1

CMD ["lowbit", "serve", "--host", "0.0.0.0", "--no-worker"]

# syntax=docker/dockerfile:1
# lwm-serve: OpenAI-compatible server for the Large World Model.
#
#   docker build -t lwm-serve .                                  # CPU (the demo; JAX_EXTRA=cpu)
#   docker build -t lwm-serve:tpu --build-arg JAX_EXTRA=tpu .    # Cloud TPU VMs
#   docker build -t lwm-serve:gpu --build-arg JAX_EXTRA=cuda12 . # NVIDIA GPUs (CUDA 12)
#   docker run -p 8000:8000 lwm-serve                            # serves the embedded demo
#   docker run lwm-serve plan --model 7b-1m --mesh 1,1,1,4 --context 131072 --device-memory tpu-v4
#   docker run --privileged --net=host -v /models/LWM-Chat-1M-Jax:/models:ro lwm-serve:tpu serve \
#       --model params::/models/params --model-config 7b-1m --tokenizer /models \
#       --vqgan /models/vqgan --dtype bfloat16 --mesh 1,1,1,4 --max-model-len 131072 --accelerator tpu
#
# The entrypoint is `lwm-serve`: arguments choose the command (serve | generate | plan);
# every serve flag is also an LWM_SERVE_* environment variable. deploy/ has the recipes.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# cpu | tpu | cuda12: which accelerator plugin jax gets (same jax version as pyproject.toml).
ARG JAX_EXTRA=cpu
ARG JAX_VERSION=0.10.2
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY model ./model
COPY tokenizers ./tokenizers
RUN case "$JAX_EXTRA" in \
      cpu|tpu|cuda12) ;; \
      *) echo "JAX_EXTRA must be cpu, tpu or cuda12 (got '$JAX_EXTRA')" >&2; exit 1 ;; \
    esac \
 && python -m venv /opt/lwm-serve \
 && /opt/lwm-serve/bin/pip install --no-cache-dir . \
 && if [ "$JAX_EXTRA" != cpu ]; then \
      /opt/lwm-serve/bin/pip install --no-cache-dir "jax[$JAX_EXTRA]==$JAX_VERSION"; \
    fi

FROM ${PYTHON_IMAGE}
ARG JAX_EXTRA=cpu
LABEL org.opencontainers.image.title="lwm-serve" \
      org.opencontainers.image.description="OpenAI-compatible server for the Large World Model (LWM)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      ai.lwm-serve.jax-extra="${JAX_EXTRA}"
ENV PATH=/opt/lwm-serve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LWM_SERVE_HOME=/var/cache/lwm-serve \
    LWM_SERVE_HOST=0.0.0.0 \
    LWM_SERVE_PORT=8000
RUN useradd --create-home --uid 10001 --user-group lwm \
 && mkdir -p /var/cache/lwm-serve/data /models \
 && chown -R lwm:lwm /var/cache/lwm-serve
COPY --from=build /opt/lwm-serve /opt/lwm-serve
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /home/lwm
# The demo model (weights, tokenizer, VQGAN) is built now, so the container starts offline.
RUN python -c "from lwm_serve.server.runtime import ensure_demo; ensure_demo()"
EXPOSE 8000
# Liveness only (/health answers while the weights load); orchestrators gate traffic on /ready.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15m --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('LWM_SERVE_PORT', '8000'), timeout=4).status != 200)"]
# SIGINT stops a PID-1 Python promptly, also while it loads weights (SIGTERM would be ignored then).
STOPSIGNAL SIGINT
ENTRYPOINT ["lwm-serve"]
CMD ["serve"]

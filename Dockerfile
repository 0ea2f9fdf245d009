# lwm-serve: OpenAI-compatible server for the Large World Model.
#
#   docker build -t lwm-serve .                                  # CPU / GPU hosts
#   docker build -t lwm-serve --build-arg JAX_EXTRA=tpu .        # TPU VMs
#   docker run -p 8000:8000 lwm-serve                            # the embedded demo
#   docker run -p 8000:8000 -v /models:/models lwm-serve \
#       --model params::/models/lwm-chat-1m/params --model-config 7b-1m \
#       --tokenizer /models/lwm-chat-1m --vqgan /models/lwm-chat-1m/vqgan
FROM python:3.11-slim

# tpu | cuda12 | (empty for CPU): which jax accelerator plugin to add.
ARG JAX_EXTRA=""
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    LWM_SERVE_HOME=/var/cache/lwm-serve \
    LWM_SERVE_HOST=0.0.0.0

WORKDIR /opt/lwm-serve
COPY pyproject.toml README.md ./
COPY server ./server
COPY model ./model
COPY tokenizers ./tokenizers
RUN pip install . \
 && if [ -n "$JAX_EXTRA" ]; then pip install "jax[$JAX_EXTRA]==0.10.2"; fi \
 && useradd --create-home --uid 1000 lwm \
 && mkdir -p "$LWM_SERVE_HOME" && chown lwm "$LWM_SERVE_HOME"

USER lwm
# Build the demo model at image build time so the container starts offline.
RUN python -c "from lwm_serve.server.runtime import ensure_demo; ensure_demo()"

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
ENTRYPOINT ["lwm-serve", "serve"]

#!/usr/bin/env bash
# Start lwm-serve on a Cloud TPU VM (single host, or every host of a pod slice).
#
#   TPU_NAME=lwm-v4 ZONE=us-central2-b ACCELERATOR=v4-8 deploy/tpu_vm.sh create
#   TPU_NAME=lwm-v4 ZONE=us-central2-b MODEL_DIR=/mnt/models/LWM-Chat-1M-Jax deploy/tpu_vm.sh serve
#
# `serve` runs the SAME command on every worker (JAX multi-controller): each host
# loads its shards, process 0 answers HTTP. The mesh spans all chips of the slice;
# the default puts every chip on the sequence axis (RingAttention), as LWM does for
# 1M-token contexts. Check the fit first: lwm-serve plan --model 7b-1m --mesh ... --context ...
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v4-8}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
MESH=${MESH:-1,1,1,-1}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-1048576}
REPO=${REPO:-https://github.com/your-org/lwm-serve.git}

case "${1:-}" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
      --accelerator-type "$ACCELERATOR" --version "$RUNTIME"
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
      set -e
      sudo apt-get update -q && sudo apt-get install -yq python3-venv git
      test -d lwm-serve || git clone $REPO lwm-serve
      cd lwm-serve && python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]==0.10.2'"
    ;;
  serve)
    : "${MODEL_DIR:?set MODEL_DIR (checkpoint directory on every worker)}"
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
      cd lwm-serve && LWM_SERVE_API_KEY='${LWM_SERVE_API_KEY:-}' nohup .venv/bin/lwm-serve serve \
        --host 0.0.0.0 --model params::$MODEL_DIR/params --model-config 7b-1m \
        --tokenizer $MODEL_DIR --vqgan $MODEL_DIR/vqgan --dtype bfloat16 \
        --mesh $MESH --max-model-len $MAX_MODEL_LEN > lwm-serve.log 2>&1 &"
    echo "serving on worker 0 of $TPU_NAME, port 8000 (logs: ~/lwm-serve/lwm-serve.log)"
    ;;
  stop)
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "pkill -f 'lwm-serve serve' || true"
    ;;
  *)
    echo "usage: $0 create|serve|stop" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# lwm-serve on Cloud TPU VMs, in the Docker image (Python and jax[tpu] come from the image,
# not from the VM). Run from a checkout of this repository, with gcloud logged in.
#
#   export TPU_NAME=lwm ZONE=us-central2-b ACCELERATOR=v4-8 MODEL_DIR=/mnt/models/LWM-Chat-1M-Jax
#   deploy/tpu_vm.sh create          # the TPU VM (or slice)
#   deploy/tpu_vm.sh build           # copy this checkout to every worker, build the tpu image there
#   deploy/tpu_vm.sh download        # MODEL_GCS=gs://bucket/LWM-Chat-1M-Jax -> MODEL_DIR on every worker
#   deploy/tpu_vm.sh serve           # single-host VM (v4-8, v5p-8, v5litepod-8, v6e-8, ...)
#   deploy/tpu_vm.sh serve-slice     # multi-host slice: every worker (--worker=all), jax.distributed
#   deploy/tpu_vm.sh tunnel          # localhost:$PORT -> worker 0 (or: SOURCE_RANGE=... firewall)
#   deploy/tpu_vm.sh logs | ready | stop | delete
#   deploy/tpu_vm.sh accelerators    # the defaults below, one line per accelerator type
#   deploy/tpu_vm.sh --dry-run serve # print every command instead of running it
#
# Defaults per accelerator type: the mesh puts every chip on the sequence axis (RingAttention,
# as LWM does for long contexts) and the context is the longest that `lwm-serve plan` says fits
# (bf16, 7b-1m, batch 1); `serve` re-checks the fit with the planner in the image before it
# starts. Override with MESH=dp,fsdp,tp,sp and MAX_MODEL_LEN=N.
#
# Multi-host: `serve-slice` starts every worker in one jax.distributed run; worker 0 serves
# HTTP, the others follow its steps (server/engine/replica.py).
set -euo pipefail

# accelerator type | chips | hosts | device memory (planner name or size) | context | runtime version
ACCELERATORS="
v4-8          4  1 tpu-v4  131072  tpu-ubuntu2204-base
v4-16         8  2 tpu-v4  262144  tpu-ubuntu2204-base
v4-32        16  4 tpu-v4  524288  tpu-ubuntu2204-base
v4-64        32  8 tpu-v4  1048576 tpu-ubuntu2204-base
v4-128       64 16 tpu-v4  1048576 tpu-ubuntu2204-base
v5p-8         4  1 tpu-v5p 524288  v2-alpha-tpuv5
v5p-16        8  2 tpu-v5p 1048576 v2-alpha-tpuv5
v5p-32       16  4 tpu-v5p 1048576 v2-alpha-tpuv5
v5litepod-4   4  1 tpu-v5e 65536   v2-alpha-tpuv5-lite
v5litepod-8   8  1 tpu-v5e 131072  v2-alpha-tpuv5-lite
v5litepod-16 16  4 tpu-v5e 262144  v2-alpha-tpuv5-lite
v5litepod-32 32  8 tpu-v5e 524288  v2-alpha-tpuv5-lite
v6e-4         4  1 32GB    131072  v2-alpha-tpuv6e
v6e-8         8  1 32GB    262144  v2-alpha-tpuv6e
v6e-16       16  4 32GB    524288  v2-alpha-tpuv6e
v6e-32       32  8 32GB    1048576 v2-alpha-tpuv6e
"

usage() {
  sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'EOF'

Settings (environment): TPU_NAME, ZONE, PROJECT (optional), ACCELERATOR (default v4-8),
IMAGE (default lwm-serve:tpu), PORT (8000), MODEL_DIR (checkpoint folder on every worker:
params, tokenizer.model, vqgan), MODEL_GCS (for download), MODEL_CONFIG (7b-1m),
PARAMS_FILE (params), SERVED_MODEL_NAME (the model id clients send; default: the
basename of MODEL_DIR), VQGAN_FILE (vqgan; empty for text-only models), MESH, MAX_MODEL_LEN,
LWM_SERVE_API_KEY (bearer key the server requires), SOURCE_RANGE and NETWORK (firewall),
EXTRA_ARGS (more lwm-serve serve flags), WORKER (logs: which worker, default 0).
EOF
}

DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
COMMAND=${1:-}
if [[ -z $COMMAND ]]; then usage >&2; exit 2; fi

ACCELERATOR=${ACCELERATOR:-v4-8}
IMAGE=${IMAGE:-lwm-serve:tpu}
PORT=${PORT:-8000}
MODEL_DIR=${MODEL_DIR:-/mnt/models/LWM-Chat-1M-Jax}
MODEL_CONFIG=${MODEL_CONFIG:-7b-1m}
SERVED_MODEL_NAME=${SERVED_MODEL_NAME:-$(basename "$MODEL_DIR")}
PARAMS_FILE=${PARAMS_FILE:-params}
VQGAN_FILE=${VQGAN_FILE-vqgan}
NETWORK=${NETWORK:-default}
CONTAINER=lwm-serve

row=$(awk -v a="$ACCELERATOR" '$1 == a' <<<"$ACCELERATORS")
if [[ -n $row ]]; then
  read -r _ CHIPS HOSTS DEVICE_MEMORY CONTEXT RUNTIME_DEFAULT <<<"$row"
elif [[ -n ${MESH:-} && -n ${MAX_MODEL_LEN:-} && -n ${DEVICE_MEMORY:-} && -n ${HOSTS:-} ]]; then
  CONTEXT=$MAX_MODEL_LEN RUNTIME_DEFAULT=${RUNTIME_VERSION:-}
else
  echo "no defaults for ACCELERATOR=$ACCELERATOR (known: $(awk 'NF {printf "%s ", $1}' <<<"$ACCELERATORS"));" \
       "set MESH, MAX_MODEL_LEN, DEVICE_MEMORY (e.g. 32GiB), HOSTS and RUNTIME_VERSION" >&2
  exit 2
fi
MESH=${MESH:-1,1,1,$CHIPS}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-$CONTEXT}
RUNTIME_VERSION=${RUNTIME_VERSION:-$RUNTIME_DEFAULT}

# One shell-quoted line per command: what --dry-run prints, and what ssh runs remotely.
quote() {
  local out="" arg
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+="$arg "; else out+="'${arg//\'/\'\\\'\'}' "; fi
  done
  printf '%s' "${out% }"
}

run() {
  if (( DRY_RUN )); then
    local line; line=$(quote "$@")
    printf '%s\n' "$line"
  else
    "$@"
  fi
}

need() { local v; for v in "$@"; do [[ -n ${!v:-} ]] || { echo "set $v (see --help)" >&2; exit 2; }; done; }

gcloud_tpu() { run gcloud compute tpus tpu-vm "$1" "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} "${@:2}"; }

# ssh WORKERS REMOTE_COMMAND_STRING
on_workers() { gcloud_tpu ssh --worker="$1" --command "$2"; }

serve_args() {  # the lwm-serve command line inside the container
  local args=(serve --host 0.0.0.0 --port "$PORT" --model "params::/models/$PARAMS_FILE"
              --model-config "$MODEL_CONFIG" --served-model-name "$SERVED_MODEL_NAME"
              --tokenizer /models --dtype bfloat16
              --mesh "$MESH" --max-model-len "$MAX_MODEL_LEN" --accelerator tpu)
  if [[ -n $VQGAN_FILE ]]; then args+=(--vqgan "/models/$VQGAN_FILE"); fi
  if [[ $1 == slice ]]; then args+=(--distributed); fi
  if [[ -n ${EXTRA_ARGS:-} ]]; then local extra; read -r -a extra <<<"$EXTRA_ARGS"; args+=("${extra[@]}"); fi
  quote "${args[@]}"
}

docker_run() {  # --privileged: the TPU chips (/dev/accel*, vfio); --net=host: the port and the
                # other workers (jax.distributed) as on the VM itself
  local cmd=(sudo docker run -d --name "$CONTAINER" --privileged --net=host --restart on-failure:3
             -v "$MODEL_DIR:/models:ro" -v lwm-serve-cache:/var/cache/lwm-serve)
  if [[ -n ${LWM_SERVE_API_KEY:-} ]]; then  # --dry-run never prints the key
    if (( DRY_RUN )); then cmd+=(-e LWM_SERVE_API_KEY=xxxxxxxx); else cmd+=(-e "LWM_SERVE_API_KEY=$LWM_SERVE_API_KEY"); fi
  fi
  printf '%s %s %s' "$(quote "${cmd[@]}")" "$(quote "$IMAGE")" "$(serve_args "$1")"
}

preflight() {  # the planner, in the image, on worker 0: refuse a context that does not fit
  on_workers 0 "$(quote sudo docker run --rm "$IMAGE" plan --model "$MODEL_CONFIG" --mesh "$MESH" \
    --context "$MAX_MODEL_LEN" --dtype bf16 --device-memory "$DEVICE_MEMORY")"
}

start() {  # start single|slice
  local workers=0
  if [[ $1 == slice ]]; then workers=all; fi
  preflight
  on_workers "$workers" "sudo docker rm -f $CONTAINER >/dev/null 2>&1; $(docker_run "$1")"
  if (( DRY_RUN )); then return; fi
  cat >&2 <<EOF
started on worker 0 of $TPU_NAME ($ACCELERATOR, mesh $MESH, context $MAX_MODEL_LEN), port $PORT.
Loading 7B weights takes minutes: '$0 logs', then '$0 ready' says 'ready'.
Reach it: '$0 tunnel' (then http://127.0.0.1:$PORT), or SOURCE_RANGE=<your CIDR> '$0 firewall'.
EOF
}

case "$COMMAND" in
  accelerators)
    printf '%-14s %6s %6s %-8s %-8s %s\n' accelerator chips hosts memory context runtime
    awk 'NF {printf "%-14s %6s %6s %-8s %-8s %s\n", $1, $2, $3, $4, $5, $6}' <<<"$ACCELERATORS" ;;
  create)
    need TPU_NAME ZONE
    gcloud_tpu create --accelerator-type "$ACCELERATOR" --version "$RUNTIME_VERSION" --tags lwm-serve ;;
  build)
    need TPU_NAME ZONE
    tarball=${TMPDIR:-/tmp}/lwm-serve-src.tar.gz
    run git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$tarball" HEAD
    gcloud_tpu scp "$tarball" "$TPU_NAME:lwm-serve-src.tar.gz" --worker=all
    on_workers all "rm -rf lwm-serve-src && mkdir lwm-serve-src && tar -xzf lwm-serve-src.tar.gz -C lwm-serve-src && $(
      quote sudo docker build --build-arg JAX_EXTRA=tpu -t "$IMAGE" lwm-serve-src)" ;;
  download)
    need TPU_NAME ZONE MODEL_GCS
    on_workers all "$(quote sudo mkdir -p "$MODEL_DIR") && $(quote sudo gcloud storage cp -r "${MODEL_GCS%/}/*" "$MODEL_DIR/")" ;;
  serve)
    need TPU_NAME ZONE
    if (( HOSTS > 1 )); then
      echo "$ACCELERATOR has $HOSTS hosts: use '$0 serve-slice' (or a single-host type)" >&2; exit 2
    fi
    start single ;;
  serve-slice)
    need TPU_NAME ZONE
    if (( HOSTS == 1 )); then
      echo "$ACCELERATOR is a single host: use '$0 serve'" >&2; exit 2
    fi
    start slice ;;
  tunnel)
    need TPU_NAME ZONE
    gcloud_tpu ssh --worker=0 -- -N -L "$PORT:127.0.0.1:$PORT" ;;
  firewall)
    need TPU_NAME ZONE SOURCE_RANGE
    run gcloud compute firewall-rules create "lwm-serve-$PORT" ${PROJECT:+--project "$PROJECT"} \
      --network "$NETWORK" --direction INGRESS --allow "tcp:$PORT" --source-ranges "$SOURCE_RANGE" \
      --target-tags lwm-serve
    gcloud_tpu describe --format 'value(networkEndpoints[0].accessConfig.externalIp)' ;;
  ready)
    need TPU_NAME ZONE
    on_workers 0 "$(quote curl -sS "http://127.0.0.1:$PORT/ready")" ;;
  logs)
    need TPU_NAME ZONE
    on_workers "${WORKER:-0}" "$(quote sudo docker logs --tail 200 "$CONTAINER")" ;;
  stop)
    need TPU_NAME ZONE
    on_workers all "sudo docker rm -f $CONTAINER" ;;
  delete)
    need TPU_NAME ZONE
    gcloud_tpu delete --quiet ;;
  *)
    echo "unknown command '$COMMAND' (see --help)" >&2; exit 2 ;;
esac

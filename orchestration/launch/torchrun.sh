#!/usr/bin/env bash
# One-Gen multi-node training with torchrun: run this script once on every node (by hand, by
# `srun` from orchestration/launch/slurm.sbatch, or by any scheduler). Each node's torchrun
# agent joins a rendezvous on the first node and starts one training process per GPU; the
# processes run `onegen train fit`, which takes the node count and processes per node from
# torchrun's environment (trainer.num_nodes / trainer.devices of the config are replaced).
#
#   # node 0 (host node0) and node 1, same command on both:
#   NNODES=2 RDZV_ENDPOINT=node0:29500 RDZV_ID=exp1 \
#   MLFLOW_TRACKING_URI=http://mlflow:5000 RUNS_DIR=/shared/runs DATA_PATHS=/shared/onegen \
#     orchestration/launch/torchrun.sh trainer.max_steps=100000 resume=auto
#
# Every argument is passed to the fit as a dotted override (key=value, values parse as YAML),
# after the ones this script derives from the knobs below, so an argument wins.
#
# Knobs (environment variables; the default after ":-"):
#   CONFIG          the fit config (training/configs/onediffusion-2.8b.yaml).
#   NNODES          nodes in the job (1); "MIN:MAX" for an elastic range.
#   NPROC_PER_NODE  training processes per node, one per GPU ("gpu": all visible GPUs;
#                   on CPU give a number).
#   RDZV_BACKEND    c10d (dynamic rendezvous; node ranks assigned on joining) or static
#                   (fixed NODE_RANK per node, MASTER_ADDR:MASTER_PORT).
#   RDZV_ENDPOINT   host:port of the rendezvous on the first node, the same on every node
#                   (MASTER_ADDR:MASTER_PORT when set; one node: localhost with a free port).
#                   The first node's agent hosts the store there; the port must be open
#                   between the nodes.
#   RDZV_ID         the job's id, the same on every node ($SLURM_JOB_ID under SLURM; required
#                   for more than one node): it keeps two jobs on one endpoint apart and names
#                   the run folder <runs_dir>/<experiment>/<config name>-<RDZV_ID>/.
#   RDZV_TIMEOUT    seconds to wait for every node to join (900).
#   NODE_RANK       this node's rank, static rendezvous only (0 on the node of RDZV_ENDPOINT).
#   MAX_RESTARTS    torchrun restarts of the whole worker group after a failure (0). A
#                   restart runs the same command: add resume=auto so it continues from the
#                   newest checkpoint instead of refusing the run folder that has some.
#   RUNS_DIR        runs_dir override: shared storage every node sees at the same path
#                   (checkpoints are sharded: every rank writes its own shard there).
#   DATA_PATHS      data.paths override: datagen output(s) on shared storage (or s3://...).
#   WEIGHTS         encoders.vae_path and encoders.text_path override: a local folder with
#                   the VAE and text encoder, present on every node (loaded offline).
#   MLFLOW_TRACKING_URI  the MLflow server, http://<host>:5000 (the config's
#                   mlflow.tracking_uri: null reads it). Only global rank 0 logs to it;
#                   without it rank 0 writes sqlite:///mlflow.db in its own working folder.
#                   Every rank opens the store at start-up; a sqlite one is opened one
#                   process at a time (a flock beside it), a server scales further.
#   OMP_NUM_THREADS CPU threads per training process (1: eight processes per node share the
#                   node's cores; data loading runs in data.num_workers worker processes).
#   NCCL_DEBUG      NCCL's log level (WARN; INFO prints the chosen network and topology).
#   NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME  the network interface for NCCL / gloo bootstrap
#                   traffic (e.g. ib0, eth0); unset: the libraries choose. NCCL_IB_DISABLE=1
#                   falls back to TCP sockets where InfiniBand is broken.
#   PYTORCH_CUDA_ALLOC_CONF  expandable_segments:True (less fragmentation under FSDP's
#                   all-gather / free cycle).
#   TORCHRUN, ONEGEN  the torchrun and onegen executables (the repository's .venv when it
#                   has one, else from PATH).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv_or_path() {
  if [ -x "$REPO/.venv/bin/$1" ]; then echo "$REPO/.venv/bin/$1"; else echo "$1"; fi
}

CONFIG="${CONFIG:-$REPO/training/configs/onediffusion-2.8b.yaml}"
NNODES="${NNODES:-1}"
NPROC_PER_NODE="${NPROC_PER_NODE:-gpu}"
RDZV_BACKEND="${RDZV_BACKEND:-c10d}"
RDZV_TIMEOUT="${RDZV_TIMEOUT:-900}"
NODE_RANK="${NODE_RANK:-0}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
TORCHRUN="${TORCHRUN:-$(venv_or_path torchrun)}"
ONEGEN="${ONEGEN:-$(venv_or_path onegen)}"

if [ -n "${MASTER_ADDR:-}" ]; then
  default_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}"
elif [ "$NNODES" = 1 ]; then
  default_endpoint="localhost:0" # one node: a free port
else
  default_endpoint=""
fi
RDZV_ENDPOINT="${RDZV_ENDPOINT:-$default_endpoint}"
RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-}}"

if [ "$NNODES" != 1 ]; then
  if [ -z "$RDZV_ENDPOINT" ]; then
    echo "torchrun.sh: set RDZV_ENDPOINT=<first node>:<port> (or MASTER_ADDR) on every node" >&2
    exit 2
  fi
  if [ -z "$RDZV_ID" ]; then
    echo "torchrun.sh: set RDZV_ID=<job id>, the same on every node (SLURM: \$SLURM_JOB_ID)" >&2
    exit 2
  fi
fi
# One node without a job id: a fresh run name from the clock, like a fit started by hand.
RDZV_ID="${RDZV_ID:-$(date +%Y%m%d-%H%M%S)}"

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 # encoders load from local folders only
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

overrides=()
if [ -n "${RUNS_DIR:-}" ]; then overrides+=("runs_dir=$RUNS_DIR"); fi
if [ -n "${DATA_PATHS:-}" ]; then overrides+=("data.paths=$DATA_PATHS"); fi
if [ -n "${WEIGHTS:-}" ]; then
  overrides+=("encoders.vae_path=$WEIGHTS" "encoders.text_path=$WEIGHTS")
fi

rdzv=(--rdzv-id "$RDZV_ID")
if [ "$RDZV_BACKEND" = static ]; then
  rdzv+=(--master-addr "${RDZV_ENDPOINT%:*}" --master-port "${RDZV_ENDPOINT##*:}")
  rdzv+=(--node-rank "$NODE_RANK")
else
  rdzv+=(--rdzv-backend "$RDZV_BACKEND" --rdzv-endpoint "$RDZV_ENDPOINT")
  rdzv+=(--rdzv-conf "join_timeout=$RDZV_TIMEOUT")
fi

set -x
exec "$TORCHRUN" --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" "${rdzv[@]}" \
  --max-restarts "$MAX_RESTARTS" \
  --no-python "$ONEGEN" train fit --config "$CONFIG" ${overrides[@]+"${overrides[@]}"} "$@"

#!/usr/bin/env bash
# Launch scaling.train with torchrun on this node, or on several nodes started by hand.
#
# One node (all its GPUs, or one process on a CPU-only machine):
#   launch/torchrun.sh recipes/gpt2_124m_fsdp.yaml [--section.key=value ...]
# Two nodes by hand, as in nanoGPT's example (run on each node, NODE_RANK 0 on the master):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 launch/torchrun.sh RECIPE
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 launch/torchrun.sh RECIPE
# Benchmark the interconnect first: the same variables with `-m scaling.bench comm` via
#   SCALING_MODULE=scaling.bench launch/torchrun.sh comm
# NPROC overrides the processes per node; SCALING_FABRIC / SCALING_IFNAME: see nccl_env.sh.
# Elastic, so that a node that dies does not end the run: SCALING_MIN_NODES=M (below NNODES) on
# every node; the nodes left (at least M) restart their workers from the newest checkpoint, up to
# SCALING_MAX_RESTARTS (default 3) times. The rendezvous lives on MASTER_ADDR (NODE_RANK 0): losing
# that node ends the run (run the same command on the nodes left, one of them the new master).
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT: the seconds the workers get from a SIGTERM (a stop: they save)
# to SIGKILL, 30 unless set; give a big model's save to a slow disk more.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/nccl_env.sh

if [ -z "${NPROC:-}" ]; then
  if command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then
    NPROC=$(nvidia-smi -L | wc -l)
  else
    NPROC=1
  fi
fi
# Threads per process: the node's cores shared out (torchrun would otherwise set 1).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}

source launch/find_python.sh
find_python || exit 2
NNODES=${NNODES:-1}
MIN_NODES=${SCALING_MIN_NODES:-$NNODES}
if [ "$NNODES" = 1 ]; then
  RDZV=(--nnodes=1 --standalone)
elif [ "$MIN_NODES" != "$NNODES" ]; then  # torchrun's elastic rendezvous, hosted by NODE_RANK 0
  RDZV=(--nnodes="$MIN_NODES:$NNODES" --max-restarts="${SCALING_MAX_RESTARTS:-3}" --rdzv_backend=c10d
        --rdzv_endpoint="${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}" --rdzv_id="${RDZV_ID:-scaling}"
        --rdzv_conf="is_host=$(( ${NODE_RANK:?set NODE_RANK} == 0 ))")
else
  RDZV=(--nnodes="$NNODES" --node_rank="${NODE_RANK:?set NODE_RANK}" --master_addr="${MASTER_ADDR:?set MASTER_ADDR}"
        --master_port="${MASTER_PORT:-29500}")
fi
# scaling.launch is torchrun with an exit code a caller can act on: 75 when every worker saved its
# step and stopped (a preemption: run the same command again), 2 for bad input, 1 for a failure.
exec "$PYTHON" -m scaling.launch --nproc_per_node="$NPROC" "${RDZV[@]}" \
  -m "${SCALING_MODULE:-scaling.train}" "$@"

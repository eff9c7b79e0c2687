# Network settings for multi-node runs, sourced by slurm_gpt2.sh and torchrun.sh.
# Everything here is opt-in: NCCL's defaults are right on a healthy Infiniband cluster. Pick a
# fabric with SCALING_FABRIC, or set any NCCL_* variable yourself (yours always wins).

# Fail a hung collective with an error instead of hanging until the job's time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}
# NCCL's flight recorder: each rank keeps its last 2,000 collectives and dumps them when one
# times out (scaling.train points the dump at <run_dir>/nccl_trace_rank_<r>; read the dumps
# with python -m torch.distributed.flight_recorder.fr_trace). Costs nothing until then.
export TORCH_FR_BUFFER_SIZE=${TORCH_FR_BUFFER_SIZE:-2000}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
# Fewer out-of-memory errors from fragmentation (evaluation and sampling change shapes).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

case "${SCALING_FABRIC:-default}" in
  default) ;;                                    # leave NCCL to detect the fabric
  ethernet)                                      # no Infiniband: TCP sockets only (nanoGPT's advice)
    export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-1} ;;
  efa)                                           # AWS Elastic Fabric Adapter through libfabric
    export FI_PROVIDER=${FI_PROVIDER:-efa}
    export FI_EFA_USE_DEVICE_RDMA=${FI_EFA_USE_DEVICE_RDMA:-1}  # GPUDirect RDMA on p4d/p5
    # No sync of CUDA memory operations on every libfabric transfer (its default costs bandwidth
    # with the aws-ofi-nccl plugin). No NCCL_PROTO: forcing Simple would also hold back the
    # NVLink traffic inside a node; the plugin tells NCCL what EFA needs for the network.
    export FI_EFA_SET_CUDA_SYNC_MEMOPS=${FI_EFA_SET_CUDA_SYNC_MEMOPS:-0} ;;
  *) echo "nccl_env.sh: unknown SCALING_FABRIC=$SCALING_FABRIC (default, ethernet, efa)" >&2; return 1 ;;
esac

# Which network interface carries the traffic (e.g. eth0, ens5, ib0), for NCCL and gloo alike.
if [ -n "${SCALING_IFNAME:-}" ]; then
  export NCCL_SOCKET_IFNAME=$SCALING_IFNAME GLOO_SOCKET_IFNAME=$SCALING_IFNAME
fi

# NCCL's own account of what it chose (rings, transports, interfaces): the first thing to read
# when multi-node runs are slow or hang.
if [ "${SCALING_NCCL_DEBUG:-0}" = 1 ]; then
  export NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=${NCCL_DEBUG_SUBSYS:-INIT,NET}
fi

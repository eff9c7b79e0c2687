"""parallelize(): the one place that shows the order in which a GPT is split over a mesh.

TP first (it turns parameters into DTensors on the tp mesh), then activation checkpointing and
torch.compile per block (both wrap block.forward in place, so parameter names never change),
then FSDP2 over the data-parallel part of the mesh, outermost. FSDP2 wraps every layout: DDP is
its replicate-only case (shard degree 1), a single process or pure TP a one-rank mesh, so its
mixed-precision policy is the one bf16 mechanism everywhere, on CPUs and GPUs alike.
"""

import torch

from scaling.parallel.ac import apply_ac
from scaling.parallel.dims import ParallelDims, build_mesh, check_model, dp_rank, resolve_dims
from scaling.parallel.fsdp import apply_fsdp
from scaling.parallel.tp import apply_tp

__all__ = ["ParallelDims", "build_mesh", "check_model", "dp_rank", "parallelize", "resolve_dims"]


def parallelize(model, dims: ParallelDims, mesh, pcfg, device: torch.device, dtype: str):
    if dims.tp > 1:
        apply_tp(model, mesh["tp"], loss_parallel=pcfg.loss_parallel, sequence_parallel=pcfg.sequence_parallel)
    if pcfg.activation_checkpoint != "none":
        apply_ac(model, pcfg.activation_checkpoint, pcfg.ac_every)
    if pcfg.compile:
        for block in model.blocks:
            block.compile()  # in place: keeps the names that checkpoints and init rely on
    # (dp_replicate, dp_shard) as HSDP's 2-D mesh when replicating, else the shard dimension.
    dp_mesh = mesh[("dp_replicate", "dp_shard")] if dims.dp_replicate > 1 else mesh["dp_shard"]
    apply_fsdp(model, dp_mesh, torch.bfloat16 if dtype == "bf16" else None, pcfg.reshard_after_forward,
               force_sum_reduction=device.type == "cpu")
    return model

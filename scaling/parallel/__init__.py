"""parallelize(): the one place that shows the order in which a GPT is split over a mesh.

TP first (it turns parameters into DTensors on the tp mesh), then activation checkpointing and
torch.compile per block (both wrap block.forward in place, so parameter names never change),
then FSDP/HSDP or DDP over the data-parallel part of the mesh, outermost.
"""

import torch

from scaling.parallel.ac import apply_ac
from scaling.parallel.ddp import apply_ddp
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
    if dims.fsdp:
        dp_mesh = mesh[("dp_replicate", "dp_shard")] if dims.dp_replicate > 1 else mesh["dp_shard"]
        # On GPUs the parameters are gathered in bf16 (reduced in fp32); on CPUs bf16 comes from
        # autocast, with fp32 parameters.
        param_dtype = torch.bfloat16 if dtype == "bf16" and device.type == "cuda" else None
        apply_fsdp(model, dp_mesh, param_dtype, pcfg.reshard_after_forward,
                   force_sum_reduction=device.type == "cpu")
    elif dims.ddp:
        apply_ddp(model, mesh["dp_replicate"])
    return model

"""parallelize(): the one place that shows the order in which a GPT is split over a mesh.

TP first (it turns parameters into DTensors on the tp mesh), then activation checkpointing and
torch.compile per block and of the head with its loss (both wrap forwards in place, so parameter
names never change),
then FSDP2 over the data-parallel part of the mesh, outermost. FSDP2 wraps every layout: DDP is
its replicate-only case (shard degree 1), a single process or pure TP a one-rank mesh, so its
mixed-precision policy is the one bf16 mechanism everywhere, on CPUs and GPUs alike.
"""

import torch
from torch.distributed.tensor import DTensor

from scaling.model import param_seed

from scaling.parallel.ac import apply_ac
from scaling.parallel.dims import ParallelDims, build_mesh, check_model, dp_rank, resolve_dims
from scaling.parallel.fsdp import apply_fsdp
from scaling.parallel.tp import apply_tp

__all__ = ["ParallelDims", "apply_compile", "build_mesh", "check_model", "dp_rank", "local_value", "parallelize",
           "resolve_dims", "seed_dropout"]


def parallelize(model, dims: ParallelDims, mesh, pcfg, device: torch.device, dtype: str):
    if dims.tp > 1:
        apply_tp(model, mesh["tp"], loss_parallel=pcfg.loss_parallel, sequence_parallel=pcfg.sequence_parallel)
    if pcfg.activation_checkpoint != "none":
        apply_ac(model, pcfg.activation_checkpoint, pcfg.ac_every)
    if pcfg.compile:
        apply_compile(model)
    # (dp_replicate, dp_shard) as HSDP's 2-D mesh when replicating, else the shard dimension.
    dp_mesh = mesh[("dp_replicate", "dp_shard")] if dims.dp_replicate > 1 else mesh["dp_shard"]
    apply_fsdp(model, dp_mesh, torch.bfloat16 if dtype == "bf16" else None, pcfg.reshard_after_forward,
               force_sum_reduction=device.type == "cpu")
    return model


def apply_compile(model):
    """Each block, and the head with the loss (model.head_loss: final norm, LM head, fp32
    cross-entropy), as whole graphs: fullgraph makes a graph break an error, not a silent
    slow-down. In place, which keeps the names that checkpoints and init rely on."""
    for block in model.blocks:
        block.compile(fullgraph=True)
    model.head_loss = torch.compile(model.head_loss, fullgraph=True)


def local_value(x: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (loss, grad norm under TP/FSDP) as a plain tensor."""
    return x.full_tensor() if isinstance(x, DTensor) else x


def seed_dropout(seed: int, dims: ParallelDims, mesh, dp_mesh, sequence_parallel: bool):
    """Seed the process's RNG, which draws the dropout masks, so that ranks holding the same
    activations draw the same masks and ranks holding different ones draw different masks.

    Data-parallel ranks hold different sequences: different seeds. Tensor-parallel ranks of one
    data-parallel rank hold the same residual stream unless sequence parallelism splits it by
    position, so without it they share a seed (else "replicated" LayerNorm weights would get
    different gradients and drift apart); with it every rank differs. Attention dropout acts on
    each rank's own heads; without sequence parallelism the TP ranks' heads then see the same
    mask pattern (head h and head h + n_head/tp), a correlation between heads, not a bias.
    """
    tp_rank = mesh["tp"].get_local_rank() if dims.tp > 1 and sequence_parallel else 0
    torch.manual_seed(param_seed(seed, f"dropout:dp{dp_rank(dp_mesh)}:tp{tp_rank}"))

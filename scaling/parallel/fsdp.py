"""FSDP2 (fully_shard): parameters, gradients and optimizer state sharded over dp_shard and
replicated over dp_replicate (HSDP; DDP when dp_shard is 1), with bf16 mixed precision."""

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def apply_fsdp(model, dp_mesh: DeviceMesh, param_dtype: torch.dtype | None, reshard_after_forward: bool,
               force_sum_reduction: bool):
    """One FSDP group per block, then the root: the embeddings, final norm and the tied LM head
    (which must share a group with the token embedding: it is the same tensor).

    Mixed precision (param_dtype bf16): the fp32 master weights are cast to bf16 when gathered,
    so the whole forward and backward (residual stream included) run in bf16; gradients are
    reduced and the optimizer steps in fp32, and the logits leave the model in fp32 for the loss.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # With a shard degree of 1 (DDP, one process, pure TP) there is nothing to free: the
    # "sharded" parameters are whole, and resharding would only drop each block's gathered copy
    # after forward and copy it again in backward (~12 GB of copies per 124M step on 8 GPUs).
    # So blocks keep their parameters there, whatever reshard_after_forward says.
    if dp_mesh.shape[-1] == 1:
        reshard_after_forward = False
    for block in model.blocks:
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # The root's parameters are needed again first thing in backward (the LM head): keep them.
    root_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, output_dtype=torch.float32)
    fully_shard(model, mesh=dp_mesh, mp_policy=root_mp, reshard_after_forward=False)
    if force_sum_reduction:
        # gloo has no PREMUL_SUM / AVG: sum gradients and divide after the reduction instead.
        for m in [*model.blocks, model]:
            m.set_force_sum_reduction_for_comms(True)

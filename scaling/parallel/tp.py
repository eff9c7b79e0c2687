"""Tensor parallelism (Megatron-style) with DTensor, optionally with sequence parallelism, over
the unmodified GPT blocks.

Inside a block, q/k/v and the MLP's fc are split by output columns (whole heads per rank), the
attention and MLP output projections by input rows: one collective before and one after
attention and the MLP. With sequence parallelism (the default) the residual stream, the
LayerNorms and dropout between those hold a slice of the sequence, so the collectives are an
all-gather and a reduce-scatter and those activations are divided by tp; without it they are
replicated and the collective after each projection is an all-reduce. The token embedding and
the tied LM head are split by vocabulary; with loss parallelism the logits stay
vocabulary-sharded through cross-entropy.
"""

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)


def apply_tp(model, tp_mesh: DeviceMesh, loss_parallel: bool = True, sequence_parallel: bool = True):
    seq = Shard(1) if sequence_parallel else Replicate()  # layout of the residual stream
    parallelize_module(model, tp_mesh, {
        # Vocabulary-parallel embedding; its output leaves in the residual stream's layout.
        "wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
        # Positions (T, C), split over positions; Shard(0) of (T, C) is the same sequence slice
        # as Shard(1) of the (B, T, C) token embeddings it is added to.
        "wpe": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(0) if sequence_parallel else Replicate()),
        "lm_head": ColwiseParallel(input_layouts=seq,
                                   output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                   use_local_output=not loss_parallel),
    })
    for block in model.blocks:
        parallelize_module(block, tp_mesh, {
            "attn": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
            "attn.q": ColwiseParallel(),
            "attn.k": ColwiseParallel(),
            "attn.v": ColwiseParallel(),
            "attn.proj": RowwiseParallel(output_layouts=seq),
            "mlp": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
            "mlp.fc": ColwiseParallel(),
            "mlp.proj": RowwiseParallel(output_layouts=seq),
        })
    for ln in [model.ln_f] + [n for b in model.blocks for n in (b.ln_1, b.ln_2)]:
        if sequence_parallel:
            parallelize_module(ln, tp_mesh, SequenceParallel())
        else:
            replicate_norm(ln, tp_mesh)
    # wte and lm_head were distributed separately (both as Shard(0) over the vocabulary):
    # point the head back at the embedding so they stay one parameter.
    model.tie_weights()
    model.seq_multiple = tp_mesh.size() if sequence_parallel else 1  # for generate()'s padding


def replicate_norm(ln, tp_mesh: DeviceMesh):
    """A LayerNorm on the full (replicated) activations. Its parameters become replicated
    DTensors like every other parameter, so clipping and checkpoints see one kind of tensor."""
    distribute_module(
        ln, tp_mesh,
        input_fn=lambda mod, inputs, mesh: tuple(DTensor.from_local(x, mesh, [Replicate()]) for x in inputs),
        output_fn=lambda mod, out, mesh: out.to_local())

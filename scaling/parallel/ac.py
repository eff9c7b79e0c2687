"""Activation checkpointing: keep a block's input, recompute its insides during backward."""

from torch.utils.checkpoint import checkpoint


def apply_ac(model, mode: str, every: int = 2):
    """mode 'full' checkpoints every block, 'selective' every `every`-th one (trading part of the
    memory saving for less recomputation)."""
    for i, block in enumerate(model.blocks):
        if mode == "full" or (mode == "selective" and i % every == 0):
            # Wrap forward on the instance rather than the module in a wrapper module, so that
            # parameter names (checkpoint keys, per-name init seeds) stay the same.
            block.forward = _checkpointed(block.forward)


def _checkpointed(forward):
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run

"""DDP: the whole model replicated, gradients all-reduced in buckets during backward."""

from torch.distributed._composable.replicate import replicate
from torch.distributed.device_mesh import DeviceMesh


def apply_ddp(model, dp_mesh: DeviceMesh):
    # The composable replicate() is DDP without a wrapper module: parameter names (and so
    # checkpoints and the per-name init) stay those of the bare model.
    # Gradients live in the communication buckets (no second copy of every gradient).
    replicate(model, device_mesh=dp_mesh, bucket_cap_mb=100, gradient_as_bucket_view=True)

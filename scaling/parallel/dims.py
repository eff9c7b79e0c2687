"""Parallel degrees: resolve -1, check them against the world size and the model, build the mesh.

The world is split as (dp_replicate, dp_shard, tp), outermost first: tensor-parallel groups are
neighbouring ranks (on one node, where the bandwidth is), data-parallel groups stride across them.
"""

import datetime
from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.distributed_c10d import _set_pg_timeout

from scaling.errors import ConfigError

NAMES = ("dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int

    @property
    def dp(self) -> int:
        """Data-parallel ranks: each sees different data."""
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.dp * self.tp

    @property
    def fsdp(self) -> bool:
        """Parameters sharded over data-parallel ranks (FSDP, HSDP)."""
        return self.dp_shard > 1

    @property
    def ddp(self) -> bool:
        """Replicated over data-parallel ranks only (FSDP's machinery with a shard degree of 1)."""
        return self.dp_replicate > 1 and not self.fsdp

    def describe(self) -> str:
        parts = [f"{n}={getattr(self, n)}" for n in NAMES if getattr(self, n) > 1]
        kind = ("HSDP" if self.dp_replicate > 1 else "FSDP") if self.fsdp else "DDP" if self.ddp else ""
        kind = "+".join(k for k in (kind, "TP" if self.tp > 1 else "") if k) or "single process"
        return f"{kind} ({', '.join(parts) or 'world_size=1'})"


def resolve_dims(parallel, world_size: int) -> ParallelDims:
    """Degrees from the recipe, with at most one -1 standing for 'the rest of the world'."""
    degrees = {n: getattr(parallel, n) for n in NAMES}
    free = [n for n, d in degrees.items() if d == -1]
    for n, d in degrees.items():
        if d == 0 or d < -1:
            raise ConfigError(f"parallel.{n}: must be a positive degree or -1, got {d}")
    if len(free) > 1:
        raise ConfigError(f"parallel: only one of {', '.join('parallel.' + n for n in free)} may be -1")
    fixed = 1
    for d in degrees.values():
        fixed *= d if d != -1 else 1
    if free:
        if world_size % fixed:
            raise ConfigError(f"parallel.{free[0]}: world size {world_size} is not divisible by the "
                              f"other degrees' product {fixed}")
        degrees[free[0]] = world_size // fixed
    dims = ParallelDims(**degrees)
    if dims.world_size != world_size:
        raise ConfigError(f"parallel: dp_replicate x dp_shard x tp = {dims.dp_replicate} x {dims.dp_shard} x "
                          f"{dims.tp} = {dims.world_size}, but the world size is {world_size}")
    return dims


def check_model(dims: ParallelDims, n_head: int, n_embd: int):
    if n_head % dims.tp:
        raise ConfigError(f"parallel.tp: {dims.tp} does not divide model.n_head={n_head}")
    if (4 * n_embd) % dims.tp:
        raise ConfigError(f"parallel.tp: {dims.tp} does not divide the MLP width {4 * n_embd}")


def build_mesh(dims: ParallelDims, device_type: str, timeout_s: float | None = None) -> tuple[DeviceMesh, DeviceMesh]:
    """The 3-D mesh (dp_replicate, dp_shard, tp) and its data-parallel part flattened to one
    dimension (what the loader splits over). One process gets a mesh of one. Every group of the
    mesh, flattened ones included, times out after timeout_s (None: the backend's default, for
    the planner's fake groups, which have none)."""
    mesh = init_device_mesh(device_type, (dims.dp_replicate, dims.dp_shard, dims.tp), mesh_dim_names=NAMES)
    groups = mesh.get_all_groups()
    if dims.dp_shard > 1 and dims.tp > 1:
        # The gradient norm of FSDP x TP parameters is partial over both dimensions; with this
        # flattened group DTensor reduces it in one all_reduce instead of two in sequence (which
        # torch warns "may give inconsistent results between ranks").
        groups.append(mesh[("dp_shard", "tp")]._flatten("dp_shard_tp").get_group())
    dp_mesh = mesh[("dp_replicate", "dp_shard")]._flatten("dp")
    if timeout_s is not None:
        # The mesh's new groups get the backend's default timeout (NCCL 10 min, gloo 30 min), not
        # the default group's. Passing ours at creation (init_device_mesh's backend_override)
        # misses the gloo half of a group split from a "cuda:nccl,cpu:gloo" world on torch 2.11
        # (it falls back to default options), so set it afterwards on every backend of every group.
        for group in groups + [dp_mesh.get_group()]:
            _set_pg_timeout(datetime.timedelta(seconds=timeout_s), group)
    return mesh, dp_mesh


def dp_rank(dp_mesh: DeviceMesh) -> int:
    return dp_mesh.get_local_rank()

"""Dropout under every parallel layout: ranks that hold the same activations draw the same
masks, ranks that hold different data or sequence positions draw different ones, parameters
replicated over tensor-parallel ranks get bit-identical gradients with dropout on, and the loss
with dropout agrees with one process's statistically.

One torchrun of 4 processes walks through the layouts (each builds its own mesh and model the
way scaling.train does) and writes what it saw; the test reads it.
"""

import pytest

from conftest import run_layout_probe

PROBE = r'''
import contextlib, json, os, sys
import torch, torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import loss_parallel
from scaling.config import load_config
from scaling.parallel import ParallelDims, build_mesh
from scaling.model import GPT
from scaling.config import model_config
from scaling.model import loss_fn
from scaling.parallel import seed_dropout
from scaling.train import build_model

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
data_root, layouts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
batch = torch.randint(0, 257, (8, 65), generator=torch.Generator().manual_seed(7))  # the global batch
DRAWS = 20


def dropout_losses(model, rows, ctx):
    """Loss on rows with dropout on, DRAWS times (new masks each time), and with it off. The
    weights are scaled up 5x first (std 0.1): at init scale dropout barely moves the loss."""
    with torch.no_grad():
        for prm in model.parameters():
            prm.mul_(5)
        with ctx():
            model.train()
            on = [value(loss_fn(model(rows[:, :-1]), rows[:, 1:])) for _ in range(DRAWS)]
            model.eval()
            off = value(loss_fn(model(rows[:, :-1]), rows[:, 1:]))
    return on, off


def value(loss):
    return (loss.full_tensor() if isinstance(loss, DTensor) else loss).item()


result = {}
if rank == 0:  # the single-process reference: the same weights (per-name init), the whole batch
    cfg = load_config(sys.argv[4], [f"--data.root={data_root}", "--model.dropout=0.2"])
    torch.manual_seed(0)
    ref = GPT(model_config(cfg, 257))  # the bare model: in fp32, FSDP's wrapper changes no number
    ref.init_weights(cfg.train.seed)
    on, off = dropout_losses(ref, batch, contextlib.nullcontext)
    result["single"] = {"on": on, "off": off}
for name, overrides in layouts.items():
    cfg = load_config(sys.argv[4], [f"--data.root={data_root}", "--model.dropout=0.2", *overrides])
    p = cfg.parallel
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp)
    mesh, dp_mesh = build_mesh(dims, "cpu")
    seed_dropout(cfg.train.seed, dims, mesh, dp_mesh, p.sequence_parallel)
    draws = [torch.empty(4) for _ in range(world)]
    dist.all_gather(draws, torch.rand(4))  # what each rank's next dropout draw starts from
    model = build_model(cfg, 257, dims, mesh, torch.device("cpu"))
    model.train()
    g = torch.Generator().manual_seed(1000 + dp_mesh.get_local_rank())  # each data rank its own batch
    xy = torch.randint(0, 257, (2, cfg.train.seq_len + 1), generator=g)
    ctx = loss_parallel if dims.tp > 1 and p.loss_parallel else contextlib.nullcontext
    with ctx():
        loss_fn(model(xy[:, :-1]), xy[:, 1:]).backward()
    # Loss with dropout over the global batch: each data rank its share, averaged over them.
    dp, dp_size = dp_mesh.get_local_rank(), dp_mesh.size()
    share = batch[dp * 8 // dp_size:(dp + 1) * 8 // dp_size]
    fresh = build_model(cfg, 257, dims, mesh, torch.device("cpu"))
    on, off = dropout_losses(fresh, share, ctx)
    means = torch.tensor(on + [off]) / dp_size
    dist.all_reduce(means, group=dp_mesh.get_group())
    losses = {"on": means[:-1].tolist(), "off": means[-1].item()}
    # Every parameter replicated over the tp dimension: its gradient on each tp rank.
    differ = []
    for pname, prm in model.named_parameters():
        grad = prm.grad
        if dims.tp == 1 and dims.dp_shard == 1:  # DDP: replicated over every rank
            local, group = grad.to_local().contiguous(), None
        elif dims.tp > 1 and isinstance(prm.placements[-1], Replicate):
            local, group = grad.to_local().contiguous(), mesh["tp"].get_group()
        else:
            continue
        got = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(got, local, group=group)
        if not all(torch.equal(got[0], x) for x in got[1:]):
            differ.append(f"{pname}: max diff {max((got[0] - x).abs().max().item() for x in got[1:]):.3g}")
    result[name] = {"draws": [d.tolist() for d in draws], "tp": dims.tp, "sp": p.sequence_parallel,
                    "differ": differ, **losses}
    dist.barrier()
if rank == 0:
    with open(out, "w") as f:
        json.dump(result, f)
dist.barrier()  # every rank done before any tears its group down (gloo aborted a rank there)
dist.destroy_process_group()
'''

LAYOUTS = {  # 4 processes each: (dp_replicate, dp_shard, tp) and sequence parallelism
    "ddp4": ["--parallel.dp_replicate=4", "--parallel.dp_shard=1"],
    "fsdp4": ["--parallel.dp_shard=4"],
    "tp2_x_dp2": ["--parallel.tp=2", "--parallel.dp_replicate=2", "--parallel.dp_shard=1",
                  "--parallel.sequence_parallel=false"],
    "tp2_sp_x_dp2": ["--parallel.tp=2", "--parallel.dp_replicate=2", "--parallel.dp_shard=1"],
    "fsdp2_x_tp2": ["--parallel.dp_shard=2", "--parallel.tp=2", "--parallel.sequence_parallel=false"],
    "fsdp2_x_tp2_sp": ["--parallel.dp_shard=2", "--parallel.tp=2"],
}


@pytest.fixture(scope="module")
def probe(data_root, tmp_path_factory):
    return run_layout_probe(PROBE, data_root, LAYOUTS, tmp_path_factory.mktemp("dropout"))


@pytest.mark.slow  # one 4-process probe of every layout: the default tier has no room for it
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_ranks_draw_the_same_masks_exactly_when_they_hold_the_same_activations(layout, probe):
    r = probe[layout]
    tp = r["tp"]
    for i in range(4):
        for j in range(i + 1, 4):
            same_data = i // tp == j // tp  # tp is the innermost mesh dimension
            same_positions = not r["sp"] or i % tp == j % tp
            assert (r["draws"][i] == r["draws"][j]) == (same_data and same_positions), (i, j)


@pytest.mark.slow  # one 4-process probe of every layout: the default tier has no room for it
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_replicated_parameters_get_identical_gradients_with_dropout_on(layout, probe):
    assert probe[layout]["differ"] == []


@pytest.mark.slow  # one 4-process probe of every layout: the default tier has no room for it
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_loss_with_dropout_agrees_with_one_process_statistically(layout, probe):
    """Same weights, same global batch: without dropout the losses are equal; with it, over 20
    mask draws, the mean agrees with one process's within 4 standard errors and the spread
    within a factor 4 in variance (dropout applied twice, or skipped on a path, changes both)."""
    from statistics import mean, variance
    got, want = probe[layout], probe["single"]
    assert got["off"] == pytest.approx(want["off"], rel=1e-5)
    assert variance(want["on"]) ** 0.5 > 0.005 * want["off"]  # the masks move the loss at this scale
    se = (variance(got["on"]) / len(got["on"]) + variance(want["on"]) / len(want["on"])) ** 0.5
    assert abs(mean(got["on"]) - mean(want["on"])) < 4 * se
    assert 0.25 < variance(got["on"]) / variance(want["on"]) < 4

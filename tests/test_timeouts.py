"""parallel.timeout_s reaches every process group a training rank holds, not only the default
one: the mesh's groups (each dimension and each flattened one) and the checkpoint's background
group. torch gives groups it creates the backend's default (gloo 30 min, NCCL 10 min) instead,
so without this a rank that dies or hangs under HSDP or FSDP x TP kept the others waiting.
"""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_layout_probe, tiny_args

TIMEOUT_S = 17  # no backend's default

# 4 processes build a run as scaling.train does and report the timeout of every backend of every
# process group they hold ("mesh_<dim>" for the mesh's; world-sized dimensions reuse the default).
PROBE = r'''
import json, sys
from pathlib import Path
import torch.distributed as dist
from torch.distributed.distributed_c10d import _world
from scaling.config import load_config
from scaling.train import build

data_root, layouts, out, recipe = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
(overrides,) = layouts.values()
cfg = load_config(recipe, [f"--data.root={data_root}", f"--logging.run_dir={Path(out).parent / 'run'}",
                           "--data.workers=0", *overrides])
run = build(cfg)
groups = {}
for pg in _world.pg_map:
    for device in pg._device_types:
        groups[f"{pg.group_desc} of {pg.size()} ({device})"] = pg._get_backend(device).options._timeout.total_seconds()
every = [None] * dist.get_world_size()
dist.all_gather_object(every, groups)
if dist.get_rank() == 0:
    Path(out).write_text(json.dumps(every))
run.stop.restore()
dist.barrier()  # every rank done before any tears its group down (gloo aborted a rank there)
dist.destroy_process_group()
'''

# Each layout's overrides and the mesh groups of its own it must hold: HSDP's flattened "dp" and
# FSDP x TP's "dp_shard_tp" span the world, so they are the default group; the checkpoint's is
# "undefined" (no description).
LAYOUTS = {
    "hsdp2x2": (["--parallel.dp_replicate=2", "--parallel.dp_shard=2"],
                ["mesh_dp_replicate", "mesh_dp_shard", "mesh_tp"]),
    "fsdp2_tp2": (["--parallel.dp_shard=2", "--parallel.tp=2"], ["mesh_dp_shard", "mesh_tp", "mesh_dp"]),
}


@pytest.mark.parametrize("layout", [pytest.param(k, marks=pytest.mark.slow) if k == "fsdp2_tp2" else k for k in LAYOUTS])
def test_every_process_group_of_a_run_times_out_after_parallel_timeout_s(layout, data_root, tmp_path):
    """Read back from each backend (gloo serves both cpu and cuda here) of each group on every rank."""
    overrides, mesh_groups = LAYOUTS[layout]
    every = run_layout_probe(PROBE, data_root, {layout: [f"--parallel.timeout_s={TIMEOUT_S}", *overrides]},
                             tmp_path)
    for rank, groups in enumerate(every):
        held = {name.split(" of ")[0] for name in groups}
        assert set(mesh_groups) <= held, (rank, groups)  # the mesh's own groups are among them
        wrong = {name: t for name, t in groups.items() if t != TIMEOUT_S}
        assert not wrong, (rank, wrong)


# Rank 3 stops itself (SIGSTOP) before its third step, as a frozen process would, after writing its
# pid for the test to clean up. Under HSDP 2x2 its peers then wait on it in the mesh's groups
# (rank 2 in their dp_shard all-gather, ranks 0 and 1 in the dp_replicate gradient all-reduce).
FREEZE_RANK_3 = """
import os, signal
if os.environ.get("RANK") == "3":
    from scaling.loader import DataLoader
    next_step, calls = DataLoader.next_step, []
    def frozen_at_3(self):
        calls.append(1)
        if len(calls) == 3:
            with open(os.environ["FROZEN_PID_FILE"], "w") as f:
                f.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGSTOP)
        return next_step(self)
    DataLoader.next_step = frozen_at_3
"""


def children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat.parent.name))
        except (OSError, ValueError):  # gone meanwhile
            continue
    return kids


def kill(pid: int):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # ended meanwhile
        pass


@pytest.mark.slow  # start-up, two steps, then the 20 s timeout: about 40 s
def test_a_stopped_rank_ends_an_hsdp_run_after_parallel_timeout_s(data_root, tmp_path):
    """The run ends (not after gloo's 30 minutes: the wall-clock limit is a hang bound) with the
    one-line message of a rank whose collective failed, and exit 1."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(FREEZE_RANK_3)
    pid_file = tmp_path / "frozen.pid"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{tmp_path / 'inject'}{os.pathsep}{ROOT}",
               FROZEN_PID_FILE=str(pid_file))
    args = tiny_args(data_root, tmp_path / "run", "--parallel.dp_replicate=2", "--parallel.dp_shard=2",
                     "--parallel.timeout_s=20", "--train.max_steps=100000", "--train.eval_every=0",
                     "--data.workers=0", "--logging.every=1")
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                          "-m", "scaling.train", *map(str, args)], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=240)
    finally:
        if p.poll() is None:  # hung: its workers (each in a session of its own; SIGKILL ends a stopped
            # one too), then torchrun
            for pid in children(p.pid):
                kill(pid)
            p.kill()
            p.communicate()
        if pid_file.exists():  # the stopped rank, if the run left it behind (and the pid is still its)
            pid = int(pid_file.read_text())
            try:
                if str(pid_file).encode() in Path(f"/proc/{pid}/environ").read_bytes():
                    os.kill(pid, signal.SIGCONT)
                    kill(pid)
            except OSError:  # gone (or going) already
                pass
    assert pid_file.exists(), err[-3000:]  # rank 3 did stop mid-run
    assert p.returncode != 0, out[-2000:]
    assert re.search(r"^error: rank \d: a collective failed \(.*\): another rank died or hung past "
                     r"parallel.timeout_s; the newest complete checkpoint is intact$", err, re.M), err[-5000:]

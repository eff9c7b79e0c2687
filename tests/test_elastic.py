"""When a node dies: elastic Slurm jobs (SCALING_MIN_NODES) on the loopback cluster of
tests/slurm_cluster.py, with every process of one node's job step killed at once (SIGKILL, as a
node that loses power takes them), mid-run. CPU processes stand in for GPUs, gloo for NCCL.

The time from the kill to the next training step is printed (run with -s to see it), not
asserted: it is a property of the settings (see the README's "When a node dies"), measured here."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, read_metrics, run_module, tiny_args
from test_checkpoint import kill_all
from test_launch import COMMON, sbatch

pytestmark = pytest.mark.slow

# Fast enough to finish in seconds, slow enough to be killed mid-run: a checkpoint every 20 steps,
# every step logged, no dropout (the runs compared need no RNG streams), fp32.
RUN = ["--train.max_steps=400", "--checkpoint.every=20", "--checkpoint.keep=0", "--logging.every=1",
       "--train.eval_every=0", "--model.dropout=0", "--parallel.timeout_s=30"]
ELASTIC = {"SCALING_MIN_NODES": "1", "SCALING_PREFLIGHT": "0"}
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}


def step_processes(job: int, node: str) -> list[int]:
    """The pids of a job step's torchrun agent and workers on one (loopback) node."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if (f"SLURM_JOB_ID={job}".encode() in env and f"SLURMD_NODENAME={node}".encode() in env
                and any(e.startswith(b"SLURM_STEP_ID=") for e in env) and b"scaling." in cmd):
            pids.append(int(proc.name))
    return pids


def logs_text(run_dir: Path) -> str:
    return "".join(f.read_text(errors="replace") for f in sorted((run_dir / "logs").glob("*.out")))


def kill_node_mid_run(slurm, job: int, run_dir: Path, node: str, after_step: int = 40) -> float:
    """SIGKILL every process of the job step on `node` once rank 0 has logged `after_step`;
    returns when it did."""
    deadline = time.time() + 180
    while not re.search(rf"^step {after_step}/", logs_text(run_dir) if (run_dir / "logs").is_dir() else "", re.M):
        assert time.time() < deadline and slurm.job(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), \
            (run_dir / f"slurm-{job}.out").read_text() + logs_text(run_dir) + slurm.logs()
        time.sleep(0.05)
    pids = step_processes(job, node)
    assert len(pids) >= 2, pids  # the agent and its worker
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return time.time()


def time_to_next_step(slurm, job: int, run_dir: Path, killed_at: float) -> float | None:
    """Seconds from the kill until a resumed run logged its first step (polled), or None."""
    while slurm.job(job).get("JobState") not in ENDED:
        after = logs_text(run_dir).split("resumed from ")[1:]
        if any(re.search(r"^step \d+/", part, re.M) for part in after):
            return time.time() - killed_at
        time.sleep(0.1)
    return None


def resumed_steps(text: str) -> list[int]:
    return [int(s) for s in re.findall(r"^resumed from \S+ at step (\d+)", text, re.M)]


def test_an_elastic_job_carries_on_without_a_dead_node_exactly_as_a_resume_by_hand(slurm, data_root, tmp_path):
    run = tmp_path / "run"
    job = sbatch(slurm, run, data_root, *RUN, env=ELASTIC)
    killed_at = kill_node_mid_run(slurm, job, run, "n2")
    took = time_to_next_step(slurm, job, run, killed_at)
    j = slurm.wait(job, ENDED)
    out, logs = (run / f"slurm-{job}.out").read_text(), logs_text(run)
    print(f"\nkill of n2 -> next training step: {took:.1f} s" if took else "\nno step after the kill seen")
    assert j["JobState"] == "COMPLETED" and j["Restarts"] == "0", out + logs + slurm.logs()
    assert re.search(rf"job {job} ended: finished \(node n2 lost on the way: the others carried on\)", out), out
    [resumed] = resumed_steps(logs)  # one restart, on the node left: world size 1
    assert resumed % 20 == 0 and resumed < 40 + 20, logs
    records = [r for r in read_metrics(run) if "loss" in r]
    steps = [r["step"] for r in records]
    # Every step once, but the ones since the checkpoint, which the restart trained again.
    cut = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[:cut] == list(range(1, steps[cut - 1] + 1)) and steps[cut:] == list(range(resumed + 1, 401)), steps
    assert steps[cut - 1] - resumed < 20 + 20  # lost: at most the steps since that checkpoint (and one log window)
    tokens_per_step = 8 * 64  # global batch x sequence length, at world size 2 and 1 alike
    assert all(r["tokens"] == r["step"] * tokens_per_step for r in records), records[cut - 2:cut + 2]
    # The same checkpoint resumed by hand at world size 1 trains the same steps on the same data.
    by_hand = tmp_path / "by_hand"
    p = run_module("scaling.train", *tiny_args(data_root, by_hand, *COMMON, *RUN,
                                               f"--checkpoint.resume={run / 'checkpoints' / f'step_{resumed}'}"))
    assert p.returncode == 0, p.stdout + p.stderr
    want = {r["step"]: r["loss"] for r in read_metrics(by_hand) if "loss" in r}
    got = {r["step"]: r["loss"] for r in records[cut:]}
    assert sorted(want) == sorted(got) == list(range(resumed + 1, 401))
    assert [got[s] for s in want] == pytest.approx([want[s] for s in want], abs=1e-5)
    # And both end at the same place in the data: every sequence of the 400 steps' batches, once.
    assert loader_state(run) == loader_state(by_hand) == {"position": 400 * 8, "seed": 1337, "seq_len": 64}


def loader_state(run_dir: Path) -> dict:
    """The data loader's state in a run's step-400 checkpoint."""
    import warnings
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore")
        return _load_state_dict_from_keys({"data"}, checkpoint_id=str(run_dir / "checkpoints" / "step_400"))["data"]


def test_an_elastic_job_whose_head_node_dies_requeues_itself_and_finishes_without_it(slurm, data_root, tmp_path):
    run = tmp_path / "run"
    job = sbatch(slurm, run, data_root, *RUN, env=ELASTIC)
    killed_at = kill_node_mid_run(slurm, job, run, "n1")
    took = time_to_next_step(slurm, job, run, killed_at)
    j = slurm.wait(job, ENDED, timeout=300)
    out, logs = (run / f"slurm-{job}.out").read_text(), logs_text(run)
    print(f"\nkill of n1 (head) -> next training step: {took:.1f} s" if took else "\nno step after the kill seen")
    assert j["JobState"] == "COMPLETED" and j["Restarts"] == "1", out + logs + slurm.logs()
    assert re.search(r"failed \(lost: n1\); requeueing job", out), out
    assert "was lost after the workers started" in out and "can every node reach it?" not in out, out
    assert "left out, lost before: n1" in out and "1 nodes x 1 processes, head n2" in out, out
    assert f"job {job} ended: finished" in out.splitlines()[-1], out
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps[-1] == 400 and resumed_steps(logs), logs


def test_without_a_minimum_node_count_a_dead_node_ends_the_job_as_before(slurm, data_root, tmp_path):
    run = tmp_path / "run"
    job = sbatch(slurm, run, data_root, *RUN, env={"SCALING_PREFLIGHT": "0"})
    kill_node_mid_run(slurm, job, run, "n2")
    j = slurm.wait(job, ENDED)
    out = (run / f"slurm-{job}.out").read_text()
    assert j["JobState"] == "FAILED" and j["Restarts"] == "0", out + logs_text(run)
    assert "elastic:" not in out and "requeueing" not in out, out
    assert not resumed_steps(logs_text(run))


def test_an_elastic_job_given_more_nodes_grows_back_to_them(slurm, data_root, tmp_path):
    run = tmp_path / "run"
    steps = [s for s in RUN if not s.startswith("--train.max_steps")]
    first = sbatch(slurm, run, data_root, *steps, "--train.max_steps=40", env=ELASTIC, nodes=1)
    assert slurm.wait(first, ENDED)["JobState"] == "COMPLETED", (run / f"slurm-{first}.out").read_text()
    second = sbatch(slurm, run, data_root, *steps, "--train.max_steps=80", env=ELASTIC)
    j = slurm.wait(second, ENDED)
    out, logs = (run / f"slurm-{second}.out").read_text(), logs_text(run)
    assert j["JobState"] == "COMPLETED", out + logs
    assert "2 nodes x 1 processes" in out and resumed_steps(logs) == [40], logs
    assert "resume: world size 1 -> 2 ranks (data-parallel 1 -> 2): 2 -> 1 micro batches of 4" in logs, logs
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps == list(range(1, 81))


def test_two_torchrun_nodes_with_a_minimum_of_one_carry_on_when_one_dies(data_root, tmp_path):
    """launch/torchrun.sh by hand on two "machines" (loopback), SCALING_MIN_NODES=1: node 1's
    launcher and worker killed mid-run, node 0 finishes the run alone."""
    args = [str(a) for a in tiny_args(data_root, tmp_path, *COMMON, *RUN)]
    env = dict(os.environ, NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000),
               NPROC="1", OMP_NUM_THREADS="1", PYTHON=sys.executable, SCALING_MIN_NODES="1")
    nodes = [subprocess.Popen(["bash", "launch/torchrun.sh", *args], cwd=ROOT, env={**env, "NODE_RANK": str(r)},
                              stdout=open(tmp_path / f"node{r}.out", "w"), stderr=subprocess.STDOUT) for r in (0, 1)]
    try:
        deadline = time.time() + 180
        while not any(r["step"] >= 40 for r in read_metrics(tmp_path)) if (tmp_path / "metrics.jsonl").is_file() else True:
            assert time.time() < deadline and all(n.poll() is None for n in nodes)
            time.sleep(0.05)
        kill_all(nodes[1])
        assert nodes[0].wait(timeout=300) == 0, (tmp_path / "node0.out").read_text()
    finally:
        for n in nodes:
            kill_all(n)
    out = (tmp_path / "node0.out").read_text() + (tmp_path / "node1.out").read_text()
    assert len(resumed_steps(out)) == 1, out
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r][-1] == 400

"""Launchers on real infrastructure: a two-node Slurm cluster started by the test, and two
torchrun "nodes" on loopback. Plus the launch environment and the layout/allocation check (the
interconnect benchmark runs in test_readme.py)."""

import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY, read_metrics, run_module, run_torchrun, tiny_args, train_losses

COMMON = ["--train.global_batch_size=8", "--train.micro_batch_size=4", "--parallel.timeout_s=60"]


def sbatch(cluster, run_dir, data_root, *overrides, time_limit="10", env=None, nodes=2):
    """`sbatch launch/slurm_gpt2.sh` with a tiny CPU recipe over both nodes; returns the job id."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    cmd = ["sbatch", "--parsable", f"--nodes={nodes}", "--cpus-per-task=1", "--gpus-per-node=0", f"--time={time_limit}",
           f"--output={run_dir}/slurm-%j.out", "launch/slurm_gpt2.sh",
           *map(str, tiny_args(data_root, run_dir, *COMMON, *overrides))]
    p = cluster.run(cmd, cwd=ROOT, env={"SCALING_DEVICE": "cpu", "SCALING_LOG_DIR": str(run_dir / "logs"), **(env or {})})
    return int(p.stdout.strip().split(";")[0])


@pytest.mark.slow
def test_sbatch_trains_over_two_nodes(slurm, data_root, tmp_path):
    job = sbatch(slurm, tmp_path, data_root)
    j = slurm.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})
    out = (tmp_path / f"slurm-{job}.out").read_text()
    assert j["JobState"] == "COMPLETED", out + slurm.logs()
    assert "2 nodes x 1 processes" in out
    port = int(re.search(r"head \S+ \(\S+:(\d+)\)", out).group(1))
    assert 20000 <= port < 32768  # below the ephemeral range the kernel gives outgoing connections
    assert "dp_shard: 2" in (tmp_path / "config.yaml").read_text()  # world size 2: one rank per node
    assert {f.name for f in (tmp_path / "logs").glob("*.out")} == {f"gpt2-{job}-node0.out", f"gpt2-{job}-node1.out"}
    assert "preflight: OK" in out and re.search(r"^0 .*\n1 ", out, re.M), out  # one table row per node
    assert all(math.isfinite(x) for x in train_losses(tmp_path))
    # The job's output names rank 0's log (on whichever node the rendezvous put it), and says it finished.
    follow = re.search(r"training started; progress: tail -f (\S+)", out)
    assert follow and re.search(r"^step \d+/\d+ .*\| loss ", Path(follow.group(1)).read_text(), re.M), out
    logs = f"{tmp_path}/logs/gpt2-{job}-node0.out {tmp_path}/logs/gpt2-{job}-node1.out"
    assert re.fullmatch(rf"[\d:]+ job {job} ended: finished; details: {logs}", out.splitlines()[-1]), out


@pytest.mark.slow
def test_time_limit_signal_from_slurm_saves_requeues_and_resumes(slurm, data_root, tmp_path):
    """A two-minute time limit and the script's own --signal=B:USR1@300: Slurm itself signals the
    batch script (on its first check, within ~30 s: 300 s exceeds the limit), which has the run
    save at a step boundary and requeues the job, until the run ends. A requeued job gets the
    signal at launch, before training starts (ignored), so it must finish the rest of the 1,000
    steps within its limit: two minutes leave room at half this machine's speed, and 1,000
    steps are more than the first job can reach before its first check at twice that speed. Every step is then logged
    exactly once, each requeued job continued from the step its predecessor saved, and the
    losses around the first resume are an uninterrupted run's."""
    steps = ["--logging.every=1", "--train.eval_every=0", "--checkpoint.every=100000",
             "--optim.decay_steps=998"]  # the schedule of max_steps=1000, whatever max_steps is
    job = sbatch(slurm, tmp_path, data_root, "--train.max_steps=1000", *steps, time_limit="2",
                 env={"SCALING_PREFLIGHT": "0"})  # the 2-minute budget is the training's
    j = slurm.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=600)
    out = (tmp_path / f"slurm-{job}.out").read_text()
    assert j["JobState"] == "COMPLETED" and int(j["Restarts"]) >= 1, out + slurm.logs()
    assert "USR1: asking the training processes to save and stop" in out and "requeueing job" in out
    assert f"job {job} ended: stopped and requeued" in out and f"job {job} ended: finished" in out.splitlines()[-1]
    logs = "".join(f.read_text() for f in (tmp_path / "logs").iterdir())
    saved = [int(x.split()[0].rstrip(",")) for x in logs.split("saved step ")[1:]]
    resumed = [int(x.split()[0]) for x in logs.split(" at step ")[1:]]
    # Every stop-save was resumed from. A job whose signal came as its training was ending (seen
    # once in CI: the second job was signalled 60 s after the first, at step ~1000) is requeued too
    # and resumes the finished run from its final checkpoint, step 1000, training nothing.
    assert saved and set(saved) <= set(resumed) <= set(saved) | {1000}, logs
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == list(range(1, 1001))
    first = min(resumed)
    run_torchrun(2, "scaling.train", *tiny_args(data_root, tmp_path / "whole", *COMMON, *steps,
                                                f"--train.max_steps={first + 3}"))
    got = {r["step"]: r["loss"] for r in read_metrics(tmp_path) if "loss" in r}
    want = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "whole") if "loss" in r}
    around = range(first - 2, first + 4)
    assert [got[s] for s in around] == pytest.approx([want[s] for s in around], rel=1e-6)


# Every save of the run takes SLOW_SAVE_S seconds longer on rank 0 before it commits, as writing
# an XL checkpoint to a network filesystem would.
SLOW_SAVES = """
import os
if os.environ.get("SLOW_SAVE_S"):
    import time
    import scaling.checkpoint as ck
    commit = ck.Checkpointer._commit
    def slow_commit(self, *args):  # whatever _commit takes
        time.sleep(float(os.environ["SLOW_SAVE_S"]))
        return commit(self, *args)
    ck.Checkpointer._commit = slow_commit
"""


@pytest.mark.slow
@pytest.mark.parametrize("shutdown_timeout, commits", [(None, True), ("30", False)], ids=["launcher", "torchrun-30s"])
def test_a_stop_save_longer_than_torchruns_30_s_still_commits_and_the_requeued_job_resumes(
        slurm, data_root, tmp_path, shutdown_timeout, commits):
    """The batch script is signalled (as Slurm does before the time limit) once training runs;
    the stop-save takes 40 s. With the launcher's shutdown timeout it commits, the job requeues
    and the next one resumes from it; with torchrun's own 30 s (the second case) the worker is
    killed mid-save and nothing is committed: the first case's check can fail."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(SLOW_SAVES)
    env = {"PYTHONPATH": f"{tmp_path / 'inject'}{os.pathsep}{ROOT}", "SLOW_SAVE_S": "40", "SCALING_PREFLIGHT": "0"}
    if shutdown_timeout:
        env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = shutdown_timeout
    steps = ["--logging.every=1", "--train.eval_every=0", "--checkpoint.every=100000", "--train.max_steps=100000"]
    job = sbatch(slurm, tmp_path, data_root, *steps, env=env)
    deadline = time.time() + 120
    while not (tmp_path / "metrics.jsonl").is_file() and time.time() < deadline:
        time.sleep(0.2)
    slurm.run(["scancel", "--signal=USR1", "--batch", str(job)])
    if commits:
        deadline = time.time() + 300  # the save, the requeue, and the next job's resume
        while "resumed from" not in logs_of(tmp_path) and time.time() < deadline:
            time.sleep(1)
        slurm.run(["scancel", str(job)], check=False)
        logs = logs_of(tmp_path)
        saved = [int(x.split()[0].rstrip(",")) for x in logs.split("saved step ")[1:]]
        resumed = [int(x.split()[0]) for x in logs.split(" at step ")[1:]]
        assert saved and resumed and resumed[0] == saved[0], logs + slurm.logs()
    else:
        slurm.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PENDING", "REQUEUED"}, timeout=180)
        slurm.run(["scancel", str(job)], check=False)
        assert not [p for p in (tmp_path / "checkpoints").glob("step_*") if not p.name.endswith(".tmp")]


# Node 1's worker stops itself (SIGSTOP) at step 5, as a frozen process would: it can neither
# time out nor take a SIGTERM.
FREEZE_NODE_1 = """
import os, signal
if os.environ.get("SLURM_NODEID") == "1" and os.environ.get("LOCAL_RANK") is not None:
    from scaling.loader import DataLoader
    next_step, calls = DataLoader.next_step, []
    def frozen_at_5(self):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGSTOP)
        return next_step(self)
    DataLoader.next_step = frozen_at_5
"""


@pytest.mark.slow
def test_a_frozen_rank_on_one_node_ends_the_whole_job_through_the_collective_timeout(slurm, data_root, tmp_path):
    """Rank 0 times out (parallel.timeout_s=10) and exits; srun's --kill-on-bad-exit ends the other
    node's step, the frozen process included. The job fails (it is not requeued: nothing asked it
    to stop) and leaves no training process behind."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(FREEZE_NODE_1)
    env = {"PYTHONPATH": f"{tmp_path / 'inject'}{os.pathsep}{ROOT}", "SCALING_PREFLIGHT": "0"}
    job = sbatch(slurm, tmp_path, data_root, "--train.max_steps=100000", "--parallel.timeout_s=10",
                 "--logging.every=1", "--train.eval_every=0", env=env)
    j = slurm.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=300)  # a hang bound
    out = (tmp_path / f"slurm-{job}.out").read_text()
    logs = "".join(f.read_text() for f in (tmp_path / "logs").iterdir())
    assert j["JobState"] == "FAILED" and int(j["Restarts"]) == 0, out + logs
    # The job's output: the rank that timed out, in its one line, and how the job ended.
    assert re.search(r"^error: rank \d: a collective failed .* another rank died or hung past parallel.timeout_s; "
                     r"the newest complete checkpoint is intact  \[1 rank on node \d\]$", out, re.M), out + logs
    assert f"job {job} ended: failed with exit 1; details: " in out.splitlines()[-1], out
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert not left, subprocess.run(["ps", "-o", "pid,stat,args", "-p", ",".join(left)], capture_output=True,
                                    text=True).stdout


# Node 1 as a broken node: another torch, and a run folder it cannot write to.
BROKEN_NODE_1 = """
import os, pathlib
if os.environ.get("SLURM_NODEID") == "1":
    import torch
    torch.__version__ = "2.0.0"
    write_text = pathlib.Path.write_text
    def read_only(self, *args, **kwargs):
        if ".preflight" in self.parts:
            raise PermissionError(13, "Permission denied")
        return write_text(self, *args, **kwargs)
    pathlib.Path.write_text = read_only
"""


@pytest.mark.slow
def test_the_preflight_stops_a_job_on_a_broken_node_with_one_line_per_problem(slurm, data_root, tmp_path):
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(BROKEN_NODE_1)
    env = {"PYTHONPATH": f"{tmp_path / 'inject'}{os.pathsep}{ROOT}"}
    job = sbatch(slurm, tmp_path, data_root, "--checkpoint.keep=100000000", env=env)  # more than any disk
    j = slurm.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    out = (tmp_path / f"slurm-{job}.out").read_text()
    found = [line for line in out.splitlines() if line.startswith("preflight: ")]
    assert j["JobState"] == "FAILED" and len(found) == 4 and found[-1] == "preflight: 3 problem(s)", out
    # Node 1 may hold rank 0 or not (the rendezvous decides): either way, the same three lines.
    assert found[0].startswith("preflight: torch versions differ: 2.13") and found[0].endswith("; 2.0.0 on node 1")
    assert found[1] == f"preflight: run folder {tmp_path} on node 1: not writable (Permission denied)"
    assert re.fullmatch(rf"preflight: run folder {tmp_path}: [\d.]+ GB free, but checkpoint.keep=100000000 "
                        r"checkpoints and the one being written need [\d.]+ GB more", found[2])
    assert not (tmp_path / "metrics.jsonl").exists()
    details = f"{tmp_path}/logs/gpt2-{job}-preflight-node0.err {tmp_path}/logs/gpt2-{job}-preflight-node1.err"
    assert out.splitlines()[-1].endswith(f" job {job} ended: bad input (exit 2); preflight failed: nothing was trained "
                                         f"(SCALING_PREFLIGHT=0 skips it); details: {details}"), out


@pytest.mark.slow
def test_a_bad_key_ends_the_job_with_its_one_line_once_and_says_bad_input(slurm, data_root, tmp_path):
    job = sbatch(slurm, tmp_path, data_root, "--train.max_step=5")
    j = slurm.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    out = (tmp_path / f"slurm-{job}.out").read_text()
    assert j["JobState"] == "FAILED" and j["ExitCode"] == "2:0", out
    unknown = "error: train.max_step: unknown key (did you mean train.max_steps?)"
    assert out.count(unknown) == 1 and f"{unknown}  [2 ranks on nodes 0, 1]" in out, out  # each rank said it
    assert "Traceback" not in out and "ChildFailedError" not in out and "frame #" not in out, out
    assert f"job {job} ended: bad input (exit 2); preflight failed: nothing was trained" in out.splitlines()[-1], out


def logs_of(run_dir):
    return "".join(f.read_text() for f in (Path(run_dir) / "logs").glob("*.out")) if (Path(run_dir) / "logs").is_dir() else ""


@pytest.mark.slow
def test_two_torchrun_nodes_on_loopback_match_one_node(data_root, tmp_path):
    """launch/torchrun.sh twice (node ranks 0 and 1, one process each), as on two machines."""
    args = [str(a) for a in tiny_args(data_root, tmp_path / "two", *COMMON)]
    env = dict(os.environ, NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000),
               NPROC="1", OMP_NUM_THREADS="1", PYTHON=sys.executable)
    nodes = [subprocess.Popen(["bash", "launch/torchrun.sh", *args], cwd=ROOT, env={**env, "NODE_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [n.communicate(timeout=300)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), outs
    run_torchrun(2, "scaling.train", *tiny_args(data_root, tmp_path / "one", *COMMON))
    assert "dp_shard: 2" in (tmp_path / "two" / "config.yaml").read_text()
    assert train_losses(tmp_path / "two") == pytest.approx(train_losses(tmp_path / "one"), rel=1e-6)


def test_tp_larger_than_the_processes_per_node_fails_fast_naming_both(data_root, tmp_path):
    p = run_module("scaling.train", *tiny_args(data_root, tmp_path, "--parallel.tp=2", "--parallel.dp_shard=1"),
                   env={"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"})
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert "parallel.tp: 2 does not fit the 1 processes per node" in p.stderr


def nccl_env(**env) -> dict:
    """The variables launch/nccl_env.sh exports, in a clean environment plus env."""
    p = subprocess.run(["bash", "-c", "source launch/nccl_env.sh && env"], cwd=ROOT, capture_output=True,
                       text=True, env={"PATH": "/usr/bin:/bin", **env}, check=True)
    return dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)


def test_launch_environment_turns_on_the_flight_recorder_and_expandable_segments_unless_set():
    got = nccl_env()
    assert got["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1" and got["TORCH_FR_BUFFER_SIZE"] == "2000"
    assert got["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert got["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert nccl_env(PYTORCH_CUDA_ALLOC_CONF="max_split_size_mb:128")["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"


def test_one_interface_setting_steers_nccl_and_gloo():
    got = nccl_env(SCALING_IFNAME="eth7", SCALING_FABRIC="ethernet")
    assert got["NCCL_SOCKET_IFNAME"] == got["GLOO_SOCKET_IFNAME"] == "eth7" and got["NCCL_IB_DISABLE"] == "1"


def test_the_efa_setting_leaves_nccls_protocol_alone_inside_the_node():
    got = nccl_env(SCALING_FABRIC="efa")
    assert got["FI_PROVIDER"] == "efa" and got["FI_EFA_SET_CUDA_SYNC_MEMOPS"] == "0"
    assert "NCCL_PROTO" not in got  # Simple everywhere would slow NVLink too
    assert nccl_env(SCALING_FABRIC="efa", FI_EFA_SET_CUDA_SYNC_MEMOPS="1")["FI_EFA_SET_CUDA_SYNC_MEMOPS"] == "1"


def find_python(cwd, **env):
    """launch/find_python.sh as the launchers use it, with a PATH that holds no project Python."""
    return subprocess.run(["bash", "-c", f"source {ROOT}/launch/find_python.sh && find_python && echo $PYTHON"],
                          cwd=cwd, env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True)


def test_launchers_find_the_checkouts_venv_without_it_on_path(tmp_path):
    python = tmp_path / ".venv" / "bin" / "python"  # what `make install` creates
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    (tmp_path / "scaling").symlink_to(ROOT / "scaling")
    p = find_python(tmp_path)
    assert p.returncode == 0 and p.stdout.strip() == str(python), p.stderr


def test_launchers_refuse_a_python_without_torch_in_one_line(tmp_path):
    p = find_python(tmp_path, PYTHON="/bin/false")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "PYTHON" in p.stderr, p.stderr


def test_the_preflight_passes_on_a_healthy_machine_and_cleans_up(data_root, tmp_path):
    p = run_torchrun(2, "scaling.preflight", TINY, f"--data.root={data_root}", f"--logging.run_dir={tmp_path / 'run'}")
    lines = p.stdout.splitlines()
    assert lines[0].split()[:4] == ["node", "host", "procs", "gpus"] and lines[1].split()[:3] == ["0", socket.gethostname(), "2"]
    assert lines[-1] == "preflight: OK" and "all-reduce bus bandwidth:" in p.stdout
    assert list((tmp_path / "run").iterdir()) == []  # its probe files are gone; training starts from an empty folder


def test_the_preflight_names_a_loopback_head_across_hosts_and_a_node_short_of_gpus(data_root, tmp_path, monkeypatch):
    from scaling.config import load_config
    from scaling.preflight import problems
    cfg = load_config(TINY, [f"--data.root={data_root}", f"--logging.run_dir={tmp_path}"])
    node = {"torch": "2.13.0", "cuda": "13.0", "nccl": "2.27.3", "driver": "580.65", "python": "3.12.3",
            "project": "e771c80", "local_world": 8, "gpus": 8}
    reports = [{**node, "node": "0", "host": "gpu-a"}, {**node, "node": "1", "host": "gpu-b", "gpus": 7}]
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    assert problems(cfg, reports, [None, None], True, 0.0, 0.0, False) == [
        "node 1 (gpu-b): 7 GPUs for 8 processes",
        "head address localhost is a loopback address, but the ranks run on 2 hosts: "
        "set MASTER_ADDR to an address the other nodes reach"]
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    assert problems(cfg, [reports[0], {**reports[1], "gpus": 8}], [None, None], True, 0.0, 0.0, False) == []


def test_the_preflight_counts_a_resumed_runs_checkpoints_as_space_already_taken(data_root, tmp_path):
    # A requeued job must not be refused for the space its own checkpoints already hold.
    import shutil
    from scaling.config import load_config
    from scaling.preflight import checkpoint_bytes, problems
    free = shutil.disk_usage(tmp_path).free
    cfg = load_config(TINY, [f"--data.root={data_root}", f"--logging.run_dir={tmp_path}"])
    per = checkpoint_bytes(cfg)
    cfg.checkpoint.keep = int(free // per) + 1000  # keep + 1 checkpoints: ~1.5 GB more than the disk has free
    ok = {"torch": "x", "cuda": "x", "nccl": "x", "driver": "x", "python": "x", "project": "x", "node": "0",
          "host": "h", "local_world": 1, "gpus": 0}
    assert any("checkpoints and the one being written need" in x for x in problems(cfg, [ok], [None], False, 0, 0, False))
    (tmp_path / "checkpoints" / "step_2").mkdir(parents=True)
    with open(tmp_path / "checkpoints" / "step_2" / "weights", "wb") as f:
        f.truncate(int(2000 * per))  # sparse: it counts at its size (~3 GB) and costs no disk
    assert problems(cfg, [ok], [None], False, 0, 0, False) == []


def test_a_run_folder_rank_0_cannot_write_is_one_problem_not_also_a_foreign_folder(data_root, tmp_path):
    # Whichever node holds rank 0 (the rendezvous decides), its failure is reported once.
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(BROKEN_NODE_1.replace('os.environ.get("SLURM_NODEID") == "1"',
                                                                                'os.environ.get("RANK") == "0"'))
    p = run_torchrun(2, "scaling.preflight", TINY, f"--data.root={data_root}", f"--logging.run_dir={tmp_path / 'run'}",
                     env={"PYTHONPATH": f"{tmp_path / 'inject'}{os.pathsep}{ROOT}"}, check=False)
    found = [line for line in p.stdout.splitlines() if line.startswith("preflight: ")]
    folder = [line for line in found if "run folder" in line]
    assert folder == [f"preflight: run folder {tmp_path / 'run'} on node 0: not writable (Permission denied)"], p.stdout



def preflight_problems(data_root, run_dir) -> list[str]:
    """One process (its own exit status and stderr: torchrun adds a traceback of its own to any
    failure); its problem lines, after checking that it reported them as problems."""
    p = run_module("scaling.preflight", TINY, f"--data.root={data_root}", f"--logging.run_dir={run_dir}")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    return [line for line in p.stdout.splitlines() if line.startswith("preflight: ")]


def test_a_run_folder_on_a_read_only_disk_is_a_preflight_problem_not_a_traceback(data_root, tmpfs):
    read_only_disk = tmpfs("ro,size=64k")
    run_dir = read_only_disk / "run"
    assert f"preflight: run folder {run_dir} on node 0: not writable (Read-only file system)" in \
        preflight_problems(data_root, run_dir)


def test_a_run_folder_under_a_file_is_a_preflight_problem_not_a_traceback(data_root, tmp_path):
    (tmp_path / "file").write_text("x")
    run_dir = tmp_path / "file" / "run"
    assert f"preflight: run folder {run_dir} on node 0: not writable (Not a directory)" in \
        preflight_problems(data_root, run_dir)

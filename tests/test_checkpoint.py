"""Checkpoints: contents, retention, exact resume after SIGKILL, damage, resharding, preemption.

The kill tests kill real training processes (whole torchrun process groups) and then re-run the
same command, as a user or a scheduler would.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, read_metrics, run_module, tiny_args
from scaling.checkpoint import checkpoints, step_of
from scaling.weights import load_model
from scaling.distributed import EXIT_PREEMPTED

FAST = ["--train.eval_every=0", "--parallel.timeout_s=60", "--train.global_batch_size=8",
        "--train.micro_batch_size=2", "--optim.warmup_steps=10", "--logging.every=10"]

LAYOUTS = {  # name: (processes, overrides)
    "single": (1, []),
    "ddp2": (2, ["--parallel.dp_replicate=2", "--parallel.dp_shard=1"]),
    "fsdp2": (2, ["--parallel.dp_shard=2"]),
    "tp2": (2, ["--parallel.tp=2", "--parallel.dp_shard=1"]),
    "fsdp4": (4, ["--parallel.dp_shard=4"]),
}


def command(layout, data_root, run_dir, *extra):
    nproc, overrides = LAYOUTS[layout]
    args = [str(a) for a in tiny_args(data_root, run_dir, *FAST, *overrides, *extra)]
    if nproc == 1:
        return [sys.executable, "-m", "scaling.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "scaling.train", *args]


def start(cmd):
    """A training run in its own process group, so that a kill reaches every rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def run(cmd, timeout=300):
    p = start(cmd)
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def descendants(pid):
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):  # a thread that just ended
            continue
        for c in children:
            out += [int(c), *descendants(int(c))]
    return out


def kill_all(p):
    """SIGKILL a run and every process it started (torchrun puts its workers in sessions of
    their own, so killing torchrun's process group alone would leave them running)."""
    pids = [p.pid, *descendants(p.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait()
    for pid in pids[1:]:  # wait until the workers are really gone
        while Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]:
            time.sleep(0.01)


def losses_by_step(run_dir):
    """Train loss per step; after a resume the re-done steps' later records win."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_checkpoint_holds_everything_needed_to_resume(data_root, tmp_path):
    run_module("scaling.train", *tiny_args(data_root, tmp_path, "--checkpoint.every=4"), check=True)
    assert [p.name for p in checkpoints(tmp_path)] == ["step_4", "step_8"]
    ck = tmp_path / "checkpoints" / "step_8"
    assert {".metadata", "config.yaml", "tokenizer.json", "rng_rank0.pt"} <= {f.name for f in ck.iterdir()}
    import torch.distributed.checkpoint as dcp
    keys = dcp.FileSystemReader(str(ck)).read_metadata().state_dict_metadata.keys()
    assert {"model.wte.weight", "optimizer.state.wte.weight.exp_avg", "data.position", "train.step"} <= set(keys)


def test_keeps_the_last_k_and_every_mth_for_good(data_root, tmp_path):
    run_module("scaling.train", *tiny_args(data_root, tmp_path, "--train.max_steps=12", "--checkpoint.every=2",
                                           "--checkpoint.keep=2", "--checkpoint.keep_every=4"), check=True)
    assert [p.name for p in checkpoints(tmp_path)] == ["step_4", "step_8", "step_10", "step_12"]


def test_old_checkpoints_are_deleted_off_the_training_thread(data_root, tmp_path, monkeypatch):
    # Deleting an XL checkpoint from a network filesystem takes minutes: on the training thread
    # rank 0 would keep every other rank waiting at the save's barrier all that time.
    import shutil
    import threading
    from scaling.config import load_config
    from scaling.train import train
    from conftest import TINY
    deleted_by, rmtree = [], shutil.rmtree

    def watched_rmtree(path, *args, **kwargs):
        if ".deleting" in Path(path).name:
            deleted_by.append(threading.current_thread().name)
        return rmtree(path, *args, **kwargs)
    monkeypatch.setattr(shutil, "rmtree", watched_rmtree)
    train(load_config(TINY, [f"--data.root={data_root}", f"--logging.run_dir={tmp_path}", "--train.max_steps=8",
                             "--checkpoint.every=2", "--checkpoint.keep=1", "--checkpoint.async_save=false"]))
    assert [p.name for p in checkpoints(tmp_path)] == ["step_8"]
    assert len(deleted_by) == 3 and all(name.startswith("checkpoint-commit") for name in deleted_by), deleted_by


# Rank 1 sees the run folder as NFS may show it to another node of a quickly requeued job: without
# the newest checkpoint. The resume decision is rank 0's alone, so rank 1 loads the same step.
HIDE_NEWEST_ON_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    import scaling.checkpoint as ck
    seen, load = ck.checkpoints, ck.Checkpointer.load
    ck.checkpoints = lambda run_dir: seen(run_dir)[:-1]
    def recorded_load(self, path, state):
        open(os.environ["LOADED_BY_RANK_1"], "w").write(path.name)
        return load(self, path, state)
    ck.Checkpointer.load = recorded_load
"""


@pytest.mark.slow
def test_ranks_that_see_different_checkpoint_folders_resume_from_the_same_step(data_root, tmp_path):
    from conftest import run_torchrun
    args = tiny_args(data_root, tmp_path / "run", "--checkpoint.every=2", "--parallel.dp_shard=2")
    run_torchrun(2, "scaling.train", *args, "--train.max_steps=6")
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(HIDE_NEWEST_ON_RANK_1)
    env = {"PYTHONPATH": f"{tmp_path / 'inject'}{os.pathsep}{ROOT}", "LOADED_BY_RANK_1": str(tmp_path / "loaded")}
    p = run_torchrun(2, "scaling.train", *args, "--train.max_steps=8", env=env)
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / 'step_6'}" in p.stdout
    assert (tmp_path / "loaded").read_text() == "step_6"  # not step_4, the newest rank 1 can see


def wait_for(p, ready, timeout=120):
    deadline = time.time() + timeout
    while not ready():
        assert p.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)


def logged_steps(run_dir):
    m = Path(run_dir) / "metrics.jsonl"
    return [r["step"] for r in read_metrics(run_dir) if "loss" in r] if m.is_file() else []


# Dropout on, so the losses continue exactly only if every rank's RNG state is restored; a
# schedule that does not depend on max_steps, so the killed run can be open-ended.
RESUMABLE = ["--model.dropout=0.1", "--optim.decay_steps=20", "--logging.every=1"]


@pytest.mark.parametrize("layout", [pytest.param("single", marks=pytest.mark.slow), pytest.param("ddp2", marks=pytest.mark.slow),
                                    "fsdp2", pytest.param("tp2", marks=pytest.mark.slow)])
def test_sigkilled_run_resumes_from_the_newest_checkpoint_with_bit_identical_losses(layout, data_root, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    rc, out = run(command(layout, data_root, whole, *RESUMABLE, "--train.max_steps=12", "--checkpoint.every=3"))
    assert rc == 0, out
    p = start(command(layout, data_root, cut, *RESUMABLE, "--train.max_steps=100000", "--checkpoint.every=3"))
    # Kill once two checkpoints exist and a step past the newest was taken (it must be redone).
    wait_for(p, lambda: len(checkpoints(cut)) >= 2 and max(logged_steps(cut), default=0) > step_of(checkpoints(cut)[-1]))
    kill_all(p)
    newest = checkpoints(cut)[-1]  # committed by a rename, so whole
    lines_before = len(read_metrics(cut))
    rc, out = run(command(layout, data_root, cut, *RESUMABLE, "--train.max_steps=12", "--checkpoint.every=3"))
    assert rc == 0, out
    assert f"resumed from {newest} at step {step_of(newest)}" in out  # the newest, not any whole one
    assert read_metrics(cut)[lines_before]["step"] == step_of(newest) + 1
    got, want = losses_by_step(cut), losses_by_step(whole)
    assert {s: got[s] for s in want} == want  # exactly, in fp32 on CPU


@pytest.mark.slow
def test_killed_during_a_save_resumes_from_the_newest_whole_checkpoint(data_root, tmp_path):
    """Kill FSDP(2) while a background save is being written (a .tmp folder exists), then run the
    same command: the interrupted save is reported and ignored, and the losses continue exactly."""
    steps = [*RESUMABLE, "--train.max_steps=24", "--checkpoint.every=1", "--checkpoint.keep=2"]
    rc, out = run(command("fsdp2", data_root, tmp_path / "whole", *steps))
    assert rc == 0, out
    run_dir, root = tmp_path / "cut", tmp_path / "cut" / "checkpoints"
    for attempt in range(10):  # the save may finish between seeing the .tmp and the kill: retry
        p = start(command("fsdp2", data_root, run_dir, *steps))
        wait_for(p, lambda: len(checkpoints(run_dir)) >= 1 and list(root.glob("step_*.tmp")))
        kill_all(p)
        interrupted = list(root.glob("step_*.tmp"))
        if interrupted:
            break
    assert interrupted, "no save was interrupted in 10 tries"
    newest = checkpoints(run_dir)[-1]  # committed by a rename, so whole
    load_model(newest)
    rc, out = run(command("fsdp2", data_root, run_dir, *steps))
    assert rc == 0, out
    assert f"ignoring {interrupted[0]} (an interrupted save" in out or f"replacing the interrupted save {interrupted[0]}" in out
    assert f"resumed from {newest} at step {step_of(newest)}" in out
    assert losses_by_step(run_dir) == losses_by_step(tmp_path / "whole")


def test_damaged_and_interrupted_checkpoints_are_reported_skipped_and_kept(data_root, tmp_path):
    run_module("scaling.train", *tiny_args(data_root, tmp_path, "--checkpoint.every=4", "--checkpoint.keep=0"),
               check=True)
    step8 = tmp_path / "checkpoints" / "step_8"
    shard = next(step8.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    (tmp_path / "checkpoints" / "step_9.tmp").mkdir()
    p = run_module("scaling.train", *tiny_args(data_root, tmp_path, "--train.max_steps=10"), check=True)
    assert f"skipping {step8}: {shard.name} is truncated" in p.stdout
    assert "step_9.tmp (an interrupted save; left in place)" in p.stdout
    assert "resumed from" in p.stdout and "step_4 at step 4" in p.stdout
    assert step8.is_dir() and (tmp_path / "checkpoints" / "step_9.tmp").is_dir()


def test_explicit_resume_from_a_missing_checkpoint_is_a_one_line_error(data_root, tmp_path):
    p = run_module("scaling.train", *tiny_args(data_root, tmp_path, f"--checkpoint.resume={tmp_path / 'nope'}"))
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "checkpoint.resume" in p.stderr, p.stderr


RESHARD = [("fsdp2", "single"), pytest.param("fsdp2", "tp2", marks=pytest.mark.slow),
           pytest.param("ddp2", "fsdp2", marks=pytest.mark.slow),
           pytest.param("fsdp2", "fsdp4", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def reference_12(data_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref12")
    rc, out = run(command("single", data_root, run_dir, "--train.max_steps=12", "--logging.every=1",
                          "--optim.warmup_steps=2", "--optim.decay_steps=10"))
    assert rc == 0, out
    return losses_by_step(run_dir)


@pytest.mark.parametrize("before, after", RESHARD, ids=["fsdp2-to-single", "fsdp2-to-tp2", "ddp2-to-fsdp2", "fsdp2-to-fsdp4"])
def test_checkpoint_resumes_under_another_layout(before, after, reference_12, data_root, tmp_path):
    """Half the run under one layout, the rest under another: the losses continue as if
    uninterrupted (model, optimizer state and data position all carried over)."""
    common = ["--logging.every=1", "--optim.warmup_steps=2", "--optim.decay_steps=10"]
    rc, out = run(command(before, data_root, tmp_path, "--train.max_steps=6", *common))
    assert rc == 0, out
    rc, out = run(command(after, data_root, tmp_path, "--train.max_steps=12", *common))
    assert rc == 0, out
    assert "resumed from" in out and "step_6 at step 6" in out
    got = losses_by_step(tmp_path)
    assert [got[s] for s in range(7, 13)] == pytest.approx([reference_12[s] for s in range(7, 13)], rel=1e-5)


def worker_pid(agent_pid, local_rank):
    """The pid of one torchrun worker, found through /proc."""
    for c in Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split():
        env = Path(f"/proc/{c}/environ").read_bytes().split(b"\0")
        if f"LOCAL_RANK={local_rank}".encode() in env:
            return int(c)
    raise AssertionError("worker not found")


@pytest.mark.parametrize("layout, sig", [pytest.param("single", signal.SIGTERM, marks=pytest.mark.slow),
                                         pytest.param("fsdp2", signal.SIGUSR1, marks=pytest.mark.slow)])
def test_stop_signal_saves_at_a_step_boundary_and_the_same_command_resumes(layout, sig, data_root, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    rc, out = run(command(layout, data_root, whole, *RESUMABLE, "--train.max_steps=30"))
    assert rc == 0, out
    p = start(command(layout, data_root, cut, *RESUMABLE, "--train.max_steps=100000", "--checkpoint.every=1000"))
    wait_for(p, lambda: len(logged_steps(cut)) >= 5)
    # Under torchrun the signal goes to one worker only (rank 1): the others must follow it.
    target = p.pid if layout == "single" else worker_pid(p.pid, 1)
    os.kill(target, sig)
    out, _ = p.communicate(timeout=120)
    if layout == "single":
        assert p.returncode == EXIT_PREEMPTED, out
    saved = checkpoints(cut)
    assert len(saved) == 1 and step_of(saved[0]) == logged_steps(cut)[-1] >= 5, out  # at a step boundary
    assert f"exiting with code {EXIT_PREEMPTED}" in out
    rc, out = run(command(layout, data_root, cut, *RESUMABLE, "--train.max_steps=30"))
    assert rc == 0, out
    assert f"step_{step_of(saved[0])} at step {step_of(saved[0])}" in out
    got, want = losses_by_step(cut), losses_by_step(whole)
    assert {s: got[s] for s in want} == want


def async_saves(tmp_path, values):
    """Save {"model": {"w": v}} asynchronously at steps 1, 2, ... in this process; return the
    Checkpointer and the address of the staged copy of w after each save."""
    import torch
    from scaling.checkpoint import Checkpointer
    from scaling.config import load_config
    cfg = load_config(None, ["--model.size=tiny", f"--logging.run_dir={tmp_path}", "--checkpoint.async_save=true",
                             "--checkpoint.keep=0"])
    ckpt = Checkpointer(cfg, {"kind": "bytes"}, "run")
    w, staged = torch.zeros(1000), []
    for step, v in enumerate(values, 1):
        w.fill_(v)
        ckpt.save(step, {"model": {"w": w}})
        ckpt.wait()
        staged.append(ckpt.stager.state_dict_cache["model"]["w"].data_ptr())
    ckpt.close()
    return ckpt, staged


def test_async_saves_stage_into_the_same_host_memory_every_time(tmp_path):
    ckpt, staged = async_saves(tmp_path, [1.0, 2.0, 3.0])
    assert ckpt.stager.reused == 2
    assert len(set(staged)) == 1


def test_async_saves_into_reused_staging_memory_each_hold_their_own_values(tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp
    async_saves(tmp_path, [1.0, 2.0, 3.0])
    for step, v in [(1, 1.0), (2, 2.0), (3, 3.0)]:
        got = {"model": {"w": torch.empty(1000)}}
        dcp.load(got, checkpoint_id=tmp_path / "checkpoints" / f"step_{step}")
        assert torch.equal(got["model"]["w"], torch.full((1000,), v)), step

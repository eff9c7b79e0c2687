"""launch/torchrun.sh (scaling.launch): the exit code says what happened, so a scheduler or a retry
loop can act on it: 75 when every worker saved and stopped, 2 for bad input, 1 for a crash."""

import os
import signal
import subprocess
import sys
import time

from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from conftest import ROOT, read_metrics, tiny_args
from scaling.checkpoint import checkpoints
from scaling.distributed import EXIT_PREEMPTED
from scaling.launch import outcome
from test_checkpoint import kill_all, worker_pid

FSDP2 = ["--parallel.dp_shard=2", "--train.global_batch_size=8", "--train.micro_batch_size=2",
         "--train.eval_every=0", "--logging.every=1", "--parallel.timeout_s=60"]


def start_launcher(data_root, run_dir, *extra):
    """launch/torchrun.sh with 2 CPU processes, in its own session (the test signals it alone)."""
    env = dict(os.environ, NPROC="2", OMP_NUM_THREADS="1", PYTHON=sys.executable)
    args = [str(a) for a in tiny_args(data_root, run_dir, *FSDP2, *extra)]
    return subprocess.Popen(["bash", "launch/torchrun.sh", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_steps(p, run_dir, n, timeout=180):
    deadline = time.time() + timeout  # a bound for a stalled run, not a speed requirement
    while sum("loss" in r for r in read_metrics(run_dir)) < n if (run_dir / "metrics.jsonl").is_file() else True:
        assert p.poll() is None, p.communicate()
        assert time.time() < deadline
        time.sleep(0.05)


def test_sigterm_to_the_launcher_saves_every_worker_and_exits_75_without_a_traceback(data_root, tmp_path):
    p = start_launcher(data_root, tmp_path, "--train.max_steps=100000", "--checkpoint.every=100000")
    try:
        wait_for_steps(p, tmp_path, 3)
        p.send_signal(signal.SIGTERM)  # to torchrun alone, as a scheduler's stop of the job step
        out, err = p.communicate(timeout=180)
    finally:
        kill_all(p)
    assert p.returncode == EXIT_PREEMPTED, (p.returncode, out[-2000:], err[-3000:])
    assert "Traceback" not in out + err and "all 2 workers saved their step and stopped" in out, err[-3000:]
    assert checkpoints(tmp_path)


def test_a_worker_killed_by_a_signal_makes_the_launcher_exit_1_naming_it(data_root, tmp_path):
    p = start_launcher(data_root, tmp_path, "--train.max_steps=100000", "--checkpoint.every=100000")
    try:
        wait_for_steps(p, tmp_path, 3)
        victim = worker_pid(p.pid, 1)
        os.kill(victim, signal.SIGKILL)  # the OOM killer, say
        out, err = p.communicate(timeout=180)
    finally:
        kill_all(p)
    assert p.returncode == 1, (p.returncode, err[-3000:])
    assert err.strip().splitlines()[-1] == f"error: launch: worker rank 1 (pid {victim}) was killed by SIGKILL; " \
                                            "the lines above say why", err[-3000:]
    assert "Traceback" not in out + err


def test_bad_input_under_the_launcher_exits_2_without_a_traceback(data_root, tmp_path):
    p = start_launcher(data_root, tmp_path, "--train.max_stepz=4")
    out, err = p.communicate(timeout=180)
    assert p.returncode == 2, (p.returncode, err[-3000:])
    assert "train.max_stepz" in err and "Traceback" not in out + err and "ChildFailedError" not in err, err


def failure(rank: int, exitcode: int):
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file="")


def test_bad_input_on_one_rank_is_exit_2_even_when_torchrun_then_ends_the_other_with_sigterm():
    """Seen under load: rank 0 refused a key and exited 2 before rank 1 did; torchrun's shutdown
    SIGTERM ended rank 1. The SIGTERM is torchrun's, not a cause."""
    assert outcome({0: failure(0, 2), 1: failure(1, -signal.SIGTERM)}, 0, 2, None) == (2, "")


def test_a_worker_killed_by_the_oom_killer_is_named_rather_than_the_one_torchrun_then_stopped():
    code, line = outcome({0: failure(0, -signal.SIGTERM), 1: failure(1, -signal.SIGKILL)}, 0, 2, None)
    assert code == 1 and line.startswith("error: launch: worker rank 1 (pid 1001) was killed by SIGKILL")

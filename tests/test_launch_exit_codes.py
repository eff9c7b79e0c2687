"""launch/torchrun.sh (scaling.launch): the exit code says what happened, so a scheduler or a retry
loop can act on it: 75 when every worker saved and stopped, 2 for bad input, 1 for a crash. And
its --report, which a Slurm job's output shows after each step (the sbatch tests are in test_launch.py)."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from conftest import ROOT, read_metrics, tiny_args
from scaling.checkpoint import checkpoints
from scaling.distributed import EXIT_PREEMPTED
from scaling.launch import BAD_INPUT, outcome, report
from test_checkpoint import kill_all, worker_pid

FSDP2 = ["--parallel.dp_shard=2", "--train.global_batch_size=8", "--train.micro_batch_size=2",
         "--train.eval_every=0", "--logging.every=1", "--parallel.timeout_s=60"]


def start_launcher(data_root, run_dir, *extra, env=None):
    """launch/torchrun.sh with 2 CPU processes, in its own session (the test signals it alone)."""
    env = dict(os.environ, NPROC="2", OMP_NUM_THREADS="1", PYTHON=sys.executable, **(env or {}))
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


@pytest.mark.slow
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


def test_bad_input_under_the_launcher_is_rank_0s_one_line_and_exit_2(data_root, tmp_path):
    p = start_launcher(data_root, tmp_path, "--train.max_stepz=4")
    out, err = p.communicate(timeout=180)
    assert p.returncode == 2, (p.returncode, err[-3000:])
    assert (out + err).strip() == "error: train.max_stepz: unknown key (did you mean train.max_steps?)", out + err


@pytest.mark.slow
def test_bad_input_in_a_slurm_job_also_leaves_the_mark_its_report_reads(data_root, tmp_path):
    p = start_launcher(data_root, tmp_path, "--train.max_stepz=4", env={"SLURM_JOB_ID": "7"})
    out, err = p.communicate(timeout=180)
    assert p.returncode == 2, (p.returncode, err[-3000:])
    assert err.strip().splitlines()[-1] == BAD_INPUT, err  # what a Slurm job's report reads as bad input


def test_ctrl_c_to_the_launcher_saves_every_worker_and_exits_130_with_rank_0s_line(data_root, tmp_path):
    p = start_launcher(data_root, tmp_path, "--train.max_steps=100000", "--checkpoint.every=100000")
    try:
        wait_for_steps(p, tmp_path, 3)
        p.send_signal(signal.SIGINT)  # what Ctrl-C sends the launcher; torchrun passes it on to its workers
        out, err = p.communicate(timeout=180)
    finally:
        kill_all(p)
    assert p.returncode == 130, (p.returncode, out[-2000:], err[-3000:])
    step = checkpoints(tmp_path)[-1].name.split("_")[1]
    assert out.strip().splitlines()[-1] == f"SIGINT: saved step {step}, exiting with code 130 (run the same command to resume)"
    assert err == "", err  # neither a traceback nor torchrun's own lines


def failure(rank: int, exitcode: int):
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file="")


def test_bad_input_on_one_rank_is_exit_2_even_when_torchrun_then_ends_the_other_with_sigterm():
    """Seen under load: rank 0 refused a key and exited 2 before rank 1 did; torchrun's shutdown
    SIGTERM ended rank 1. The SIGTERM is torchrun's, not a cause."""
    assert outcome({0: failure(0, 2), 1: failure(1, -signal.SIGTERM)}, 0, 2, None) == (2, BAD_INPUT)


def test_a_worker_killed_by_the_oom_killer_is_named_rather_than_the_one_torchrun_then_stopped():
    code, line = outcome({0: failure(0, -signal.SIGTERM), 1: failure(1, -signal.SIGKILL)}, 0, 2, None)
    assert code == 1 and line.startswith("error: launch: worker rank 1 (pid 1001) was killed by SIGKILL")


def test_a_rendezvous_that_never_completes_is_one_line_and_exit_1_not_a_traceback():
    with socket.socket() as s:  # a free port on loopback; the other node never comes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.run([sys.executable, "-m", "scaling.launch", "--nnodes=2", "--nproc_per_node=1",
                        "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_conf=join_timeout=3",
                        "-m", "scaling.preflight"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == (f"error: launch: the rendezvous at 127.0.0.1:{port} failed "
                                                 "(RendezvousTimeoutError): can every node reach it?")


# What a node's log holds around a rank's one line: torchrun's own log, C++ frames, a traceback.
NOISE = """E1204 20:03:27.543000 15552 api.py:1002] failed (exitcode: 2) local_rank: 0 (pid: 15578) of binary: python
[W1204 20:12:39.084464735 TCPStore.cpp:115] [c10d] recvVector failed: Failed to recv, got 0 bytes.
frame #0: c10::Error::Error(c10::SourceLocation, std::string) + 0x9d (0x7f9823179b8d in libc10.so)
Traceback (most recent call last):
  File "torch/distributed/run.py", line 1032, in <module>
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
"""
UNKNOWN_KEY = "error: train.max_step: unknown key (did you mean train.max_steps?)"


def node_logs(tmp_path, *texts) -> list[tuple[str, int]]:
    """Node k's log holds texts[k]; report() reads each from its start."""
    for k, text in enumerate(texts):
        (tmp_path / f"node{k}.out").write_text(text)
    return [(str(tmp_path / f"node{k}.out"), 0) for k in range(len(texts))]


def test_a_job_report_names_each_error_line_once_with_how_many_ranks_on_which_nodes_and_nothing_else(tmp_path):
    disk = "error: runs/x: no space left on device; the checkpoints saved before are intact"
    logs = node_logs(tmp_path, f"{UNKNOWN_KEY}\n{NOISE}{UNKNOWN_KEY}\n", f"{NOISE}{UNKNOWN_KEY}\n{disk}\n",
                     f"{UNKNOWN_KEY}\n", f"{UNKNOWN_KEY}\n{NOISE}")
    assert report(logs)[0] == [f"{UNKNOWN_KEY}  [5 ranks on nodes 0-3]", f"{disk}  [1 rank on node 1]"]


def test_a_job_report_reads_a_requeued_jobs_log_from_where_this_step_began(tmp_path):
    (log,) = node_logs(tmp_path, f"{UNKNOWN_KEY}\n")  # the job before the requeue
    begins = os.path.getsize(log[0])
    with open(log[0], "a") as f:
        f.write("step 2 | loss 5.52\n")
    assert report([(log[0], begins)]) == ([], 0)


def test_a_job_report_calls_bad_input_bad_input_though_slurm_then_ended_the_other_nodes_launcher(tmp_path):
    """Node 0's workers refused a key; srun --kill-on-bad-exit then ended node 1's launcher with
    SIGTERM. The command the Slurm script runs: the cause once, exit 2."""
    ended = "error: launch: SIGTERM ended the workers; 0 of 1 saved their step first (the newest complete checkpoint is intact)"
    logs = node_logs(tmp_path, f"{UNKNOWN_KEY}\n{NOISE}{BAD_INPUT}\n", f"{NOISE}{ended}\n")
    p = subprocess.run([sys.executable, "-m", "scaling.launch", "--report", *(f"{path}@{offset}" for path, offset in logs)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stdout) == (2, f"{UNKNOWN_KEY}  [1 rank on node 0]\n"), p.stderr


def test_a_job_report_calls_a_worker_killed_on_one_node_a_failure_naming_that_node(tmp_path):
    killed = "error: launch: worker rank 1 (pid 4242) was killed by SIGKILL; the lines above say why"
    ended = "error: launch: SIGTERM ended the workers; 0 of 1 saved their step first (the newest complete checkpoint is intact)"
    assert report(node_logs(tmp_path, f"{NOISE}{ended}\n", f"{NOISE}{killed}\n")) == ([f"{killed}  [node 1]"], 1)


STOPPED_LINE = outcome({}, saved=1, nproc=1, stopped_by=None)[1]  # what a launcher prints then


def test_a_job_report_calls_a_stop_that_srun_cut_short_on_the_slower_node_a_clean_stop(tmp_path):
    """A SIGTERM that reached the workers directly: they saved and stopped; node 0 exited 75 first and
    srun --kill-on-bad-exit ended node 1 on its way out (srun's status 143). The checkpoint is
    committed before any worker stops, so the job requeues: 75, nothing to report."""
    ended = "error: launch: SIGTERM ended the workers; 0 of 1 saved their step first (the newest complete checkpoint is intact)"
    assert report(node_logs(tmp_path, f"{STOPPED_LINE}\n", f"{STOPPED_LINE}\n{NOISE}")) == ([], 75)
    assert report(node_logs(tmp_path, f"{STOPPED_LINE}\n", f"{NOISE}{ended}\n")) == ([], 75)


def test_a_job_report_calls_a_stop_with_a_failed_worker_on_another_node_a_failure(tmp_path):
    killed = "error: launch: worker rank 1 (pid 4242) was killed by SIGKILL; the lines above say why"
    assert report(node_logs(tmp_path, f"{STOPPED_LINE}\n", f"{NOISE}{killed}\n")) == ([f"{killed}  [node 1]"], 1)


# A worker that exits with the code CODES gives for its attempt (torchrun's restart count), after
# marking a clean stop for 75 as scaling.train does; every attempt is counted in ATTEMPTS.
WORKER = """
import os, sys
from scaling.distributed import mark_preempted
attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
with open(os.environ["ATTEMPTS"], "a") as f:
    f.write(f"{attempt}\\n")
code = int(os.environ["CODES"].split(",")[attempt])
if code == 75:
    mark_preempted(75)
sys.exit(code)
"""


def launch_worker(tmp_path, codes, max_restarts):
    (tmp_path / "worker.py").write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}", CODES=codes, ATTEMPTS=str(tmp_path / "attempts"))
    p = subprocess.run([sys.executable, "-m", "scaling.launch", "--standalone", "--nproc_per_node=1",
                        f"--max-restarts={max_restarts}", "-m", "worker"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    return p, len((tmp_path / "attempts").read_text().split())


@pytest.mark.parametrize("codes, exit_code, attempts", [("1,0", 0, 2), ("2,0", 2, 1), ("3,0", 1, 1)],
                         ids=["crash-restarted", "bad-input-not", "non-finite-not"])
def test_the_launcher_restarts_a_crash_but_not_what_would_fail_the_same_way_again(tmp_path, codes, exit_code, attempts):
    p, ran = launch_worker(tmp_path, codes, max_restarts=1)
    assert (p.returncode, ran) == (exit_code, attempts), p.stdout + p.stderr


def test_a_clean_stop_before_a_restart_does_not_make_the_attempt_after_it_a_clean_stop(tmp_path):
    """Another node's death makes the workers here stop cleanly (75) and torchrun restart them;
    if that attempt then crashes, the launcher says so (1), not 'all workers saved and stopped'."""
    p, ran = launch_worker(tmp_path, "75,1", max_restarts=1)
    assert (p.returncode, ran) == (1, 2), p.stdout + p.stderr
    assert "worker rank 0 (pid" in p.stderr and "exited with code 1" in p.stderr, p.stderr


def test_an_elastic_rendezvous_gets_short_heartbeat_and_last_call_timeouts_and_slurm_node_0_hosts_it():
    from scaling.launch import rendezvous_conf
    conf = lambda *a: dict(kv.split("=") for kv in rendezvous_conf(*a).split(",") if kv)
    assert conf("1:2", "", None) == {"join_timeout": "600", "last_call_timeout": "10", "keep_alive_interval": "2",
                                     "keep_alive_max_attempt": "3"}
    assert conf("1:2", "last_call_timeout=60", "1")["last_call_timeout"] == "60"  # the user's own settings win
    assert conf("1:2", "", "1")["is_host"] == "0" and conf("2", "", "0") == {"is_host": "1"}
    assert conf("2", "", None) == conf("2:2", "", None) == {}  # not elastic: torchrun's own defaults

"""What a run tells its user: progress and ETA on every metric line, a clock that goes on across
resumes, one line per committed checkpoint, a closing summary, Ctrl-C that saves, a finished run
that says so, an extended run that says what happens to its learning rate, and missing wandb
credentials found before anything is built."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, read_metrics, run_module, tiny_args
from scaling.checkpoint import checkpoints, problem
from scaling.metrics import format_line, peak_for
from test_launch_exit_codes import wait_for_steps

LINE = re.compile(r"^step (\d+)/(\d+) [\d.]+% \| loss [\d.]+ \| \d+ms \| [\d.]+[kMB]? tok/s \| [\d.]+GB \| "
                  r"[\d.]+[kMB]? tok \| time \S+ (warm-up|eta \S+)$", re.M)


def train(data_root, run_dir, *extra, **kw):
    return run_module("scaling.train", *tiny_args(data_root, run_dir, *extra), **kw)


@pytest.fixture(scope="module")
def finished(data_root, tmp_path_factory):
    """(stdout, run folder) of a 12-step run logged every 3 steps, evaluated and saved every 4."""
    run_dir = tmp_path_factory.mktemp("finished") / "r"
    p = train(data_root, run_dir, "--train.max_steps=12", "--logging.every=3", "--checkpoint.every=4", check=True)
    return p.stdout, run_dir


@pytest.fixture(scope="module")
def resumed(data_root, tmp_path_factory):
    """(stdout of the resume, run folder): 4 steps, then 2 more. Before the resume, a record
    says the run had been going for 1000 s (its clock must go on from there)."""
    run_dir = tmp_path_factory.mktemp("resumed")
    train(data_root, run_dir, "--train.max_steps=4", check=True)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "val_loss": 5.0, "tokens": 1024, "elapsed_s": 1000.0}) + "\n")
    return train(data_root, run_dir, "--train.max_steps=6", check=True).stdout, run_dir


def test_each_metric_line_shows_progress_time_per_step_tokens_and_an_eta(finished):
    out, run_dir = finished
    lines = LINE.findall(out)
    assert [(int(s), int(m)) for s, m, _ in lines] == [(3, 12), (6, 12), (9, 12), (12, 12)], out
    assert [w for *_, w in lines][0] == "warm-up" and all(w.startswith("eta ") for *_, w in lines[1:]), out
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["tokens"] for r in records] == [3 * 256 * k for k in (1, 2, 3, 4)]  # tiny: 4 x 64 tokens a step
    assert [r["warmup"] for r in records] == [True, False, False, False]
    assert records[0]["eta_s"] is None and all(isinstance(r["eta_s"], float) for r in records[1:])  # (no bound on it)
    assert all(r["max_steps"] == 12 and r["ms_per_step"] > 0 for r in records)


def test_the_console_line_fits_100_columns_at_the_gpt2_recipes_scale():
    # Step 123,456 of the 124M recipe's 600,000 on a GPU with a known peak: the longest usual line.
    r = {"step": 123456, "max_steps": 600000, "loss": 2.91342, "lr": 4.9e-4, "grad_norm": 0.31, "ms_per_step": 412.3,
         "tokens_per_sec": 1.19e6, "mfu": 0.4512, "mem_gb": 38.21, "tokens": 60.7e9, "elapsed_s": 50880,
         "eta_s": 194700, "warmup": False}
    line = format_line(r)
    assert line == "step 123456/600000 21% | loss 2.9134 | 412ms | mfu 45% | 38.2GB | 60.7B tok | time 14h08m eta 54h05m"
    assert len(line) <= 100


def test_mfu_peaks_are_found_by_the_whole_device_name_and_none_for_an_unknown_one():
    assert peak_for("NVIDIA L40S") == 362e12 and peak_for("NVIDIA L4") == 121e12  # not L4's for an L40S
    assert peak_for("NVIDIA H100 PCIe") == 756e12 and peak_for("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_for("NVIDIA H200") == 989e12 and peak_for("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_for("NVIDIA H100 Something New") is None  # mfu "-" rather than another card's figure


def test_a_cpu_run_leaves_fp32_matmuls_exact(data_root, tmp_path):
    # train.tf32 (on by default) is for CUDA: on a CPU nothing may lower fp32 matmul precision.
    from scaling.config import load_config
    from scaling.train import train as train_here
    train_here(load_config(tiny_args(data_root, tmp_path)[0], [str(a) for a in tiny_args(data_root, tmp_path)[1:]]))
    assert torch.get_float32_matmul_precision() == "highest"
    assert torch.backends.cuda.matmul.fp32_precision == "none"


def test_the_runs_clock_goes_on_across_a_resume(resumed):
    _, run_dir = resumed
    after = [r for r in read_metrics(run_dir) if r["step"] > 4]
    assert after and all(r["elapsed_s"] >= 1000 for r in after)  # goes on from the planted 1000 s, however fast


def test_each_committed_checkpoint_prints_its_step_size_and_path(finished):
    out, run_dir = finished
    saved = re.findall(r"^checkpoint: step (\d+) saved, ([\d.]+) MB, training blocked [\d.]+s: (\S+)$", out, re.M)
    assert [(int(s), path) for s, _, path in saved] == [(k, str(run_dir / "checkpoints" / f"step_{k}"))
                                                        for k in (4, 8, 12)], out
    size = sum(f.stat().st_size for f in (run_dir / "checkpoints" / "step_12").iterdir())
    assert float(saved[-1][1]) == pytest.approx(size / 1e6, abs=0.06)


@pytest.mark.slow
def test_a_finished_run_closes_with_a_summary_whose_commands_work(finished, tmp_path):
    out, run_dir = finished
    tail = out[out.index("\ndone: "):].strip().splitlines()
    assert tail[0].startswith("done: step 12/12, 3,072 tokens in "), tail
    val = {r["step"]: r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r}
    best = min(val, key=val.get)
    assert tail[1] == f"validation loss: {val[12]:.4f} at step 12 (best {val[best]:.4f} at step {best})"
    assert tail[2] == f"newest checkpoint: {run_dir / 'checkpoints' / 'step_12'}"
    commands = [line.split(": ", 1)[1].split() for line in tail[3:]]
    assert [c[:3] for c in commands] == [["python", "-m", "scaling.sample"], ["python", "-m", "scaling.eval"],
                                         ["python", "-m", "scaling.convert"]]
    for c in commands:  # each runs as printed (the export writes under the working folder)
        done = subprocess.run([sys.executable, *c[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (c, done.stderr)
    assert (tmp_path / "out" / "tiny" / "config.json").is_file()


def test_the_summary_of_a_resumed_run_counts_this_command_and_the_whole_run(resumed):
    out, *_ = resumed
    assert re.search(r"^done: step 6/6, 1,536 tokens in \S+ \(this command: 2 steps, 512 tokens in \S+\)$",
                     out, re.M), out


def start(data_root, run_dir, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "scaling.train", *map(str, tiny_args(data_root, run_dir, *extra))],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def test_ctrl_c_saves_the_step_and_exits_130_saying_how_to_resume(data_root, tmp_path):
    p = start(data_root, tmp_path, "--train.max_steps=100000", "--logging.every=1", "--train.eval_every=0")
    try:
        wait_for_steps(p, tmp_path, 3)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 130, (p.returncode, err[-3000:])
    stop = re.search(r"^SIGINT: saved step (\d+), exiting with code 130 \(run the same command to resume\)$", out, re.M)
    assert stop and "Traceback" not in out + err and "KeyboardInterrupt" not in err, (out[-2000:], err[-2000:])
    assert [c.name for c in checkpoints(tmp_path)] == [f"step_{stop.group(1)}"]
    again = train(data_root, tmp_path, f"--train.max_steps={int(stop.group(1)) + 2}", "--logging.every=1",
                  "--train.eval_every=0", check=True)  # the same command, with an end in sight
    assert f"resumed from {tmp_path / 'checkpoints' / ('step_' + stop.group(1))}" in again.stdout


def importing_torch(pid: int) -> bool:
    """Whether process pid has begun to load torch's libraries (the entry point sets its SIGINT
    handler before it imports torch)."""
    return "libtorch" in open(f"/proc/{pid}/maps").read()


def test_ctrl_c_before_training_starts_is_one_line_and_exit_130(data_root, tmp_path):
    p = start(data_root, tmp_path, "--train.max_steps=100000")
    try:
        while not importing_torch(p.pid):
            assert p.poll() is None
            time.sleep(0.005)
        p.send_signal(signal.SIGINT)  # during the imports: seconds before a step
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert (p.returncode, out, err) == (130, "", "error: interrupted: nothing was saved by this command (the "
                                                 "checkpoints saved before are intact)\n")


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once_keeping_the_checkpoints_saved_before(data_root, tmp_path):
    # A model whose steps take a good part of a second, so both signals land inside one step.
    slow = ["--model.size=null", "--model.n_layer=4", "--model.n_head=4", "--model.n_embd=256",
            "--train.micro_batch_size=16", "--train.max_steps=100000", "--logging.every=1", "--train.eval_every=0",
            "--checkpoint.every=2"]
    p = start(data_root, tmp_path, *slow)
    try:
        wait_for_steps(p, tmp_path, 3)
        p.send_signal(signal.SIGINT)
        time.sleep(0.1)  # two signals at once would be one: the first is taken, the second ends it
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 130, (p.returncode, err[-3000:])
    assert err.strip().splitlines()[-1:] == ["SIGINT again: exiting now without saving (the checkpoints saved "
                                             "before are intact)"], err[-3000:]
    assert "Traceback" not in out + err and "saved step" not in out
    assert checkpoints(tmp_path) and all(problem(c, verify=True) is None for c in checkpoints(tmp_path))


def files(folder):
    return {f.relative_to(folder): f.read_bytes() for f in folder.rglob("*") if f.is_file() and f.name != ".lock"}


def test_resuming_a_finished_run_says_so_and_exits_0_leaving_the_folder_as_it_was(data_root, finished):
    _, run_dir = finished
    before = files(run_dir)
    p = train(data_root, run_dir, "--train.max_steps=10", "--logging.every=3", "--checkpoint.every=4",
              "--optim.lr=1e-2")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == (f"{run_dir}: finished, nothing to train: it holds 3 checkpoints up to step_12; "
                                f"step_12 is past train.max_steps=10. To train it longer, raise "
                                f"--train.max_steps; to start a new run, give another --logging.run_dir (or move "
                                f"{run_dir} away)"), p.stdout
    assert files(run_dir) == before  # config.yaml still holds the finished run's lr


def test_extending_a_run_says_what_happens_to_its_learning_rate(data_root, finished, tmp_path):
    # tiny: warmup 2, cosine to min_lr 1e-4 at step 12; extended to 16 the decay moves to step 16.
    shutil.copytree(finished[1], tmp_path / "r")
    p = train(data_root, tmp_path / "r", "--train.max_steps=16", check=True)
    assert ("resume: the learning rate at step 13 is 2.69e-04, where the schedule it was saved with had 1.00e-04; "
            "to keep the schedule it was on, add --optim.decay_steps=10 (the added steps then train at "
            "optim.min_lr)") in p.stdout.splitlines(), p.stdout


def test_decay_steps_keeps_an_extended_run_on_its_schedule(data_root, finished, tmp_path):
    shutil.copytree(finished[1], tmp_path / "r")
    p = train(data_root, tmp_path / "r", "--train.max_steps=16", "--optim.decay_steps=10", check=True)
    assert "resume: the learning rate schedule goes on as before (lr 1.00e-04 at step 13)" in p.stdout.splitlines()
    assert [r["lr"] for r in read_metrics(tmp_path / "r") if "loss" in r and r["step"] > 12] == [1e-4] * 2


def test_online_wandb_without_credentials_is_one_line_before_anything_is_written(data_root, tmp_path):
    env = {"HOME": str(tmp_path / "home"), "WANDB_API_KEY": "", "WANDB_MODE": "online", "NETRC": str(tmp_path / "netrc")}
    p = train(data_root, tmp_path / "r", "--logging.wandb=true", env=env)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == ("error: logging.wandb: no Weights & Biases credentials on this machine: run "
                                "`wandb login`, set WANDB_API_KEY, or add --logging.wandb_mode=offline (sync later)")
    assert not (tmp_path / "r").exists() and "model:" not in p.stdout

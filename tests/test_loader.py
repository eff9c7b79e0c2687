"""The training loader: its order, how ranks share a step, read-ahead, and exact resume."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, TINY, read_metrics, tiny_args
from scaling.checkpoint import checkpoints, step_of
from scaling.config import load_config
from scaling.data import TokenWindows, write_tokens
from scaling.distributed import EXIT_PREEMPTED
from scaling.loader import DataLoader, shuffle, window_indices

SEQ = 8


def numbered_dataset(path, tokens=4_000, per_file=1_500):
    """Token ids 0, 1, 2, ... (all distinct) in files of per_file tokens: a window's first id
    names it, so batches can be compared by what they hold."""
    path.mkdir(parents=True, exist_ok=True)
    files = []
    for k, start in enumerate(range(0, tokens, per_file)):
        files.append(f"train_{k:06d}.bin")
        write_tokens(path / files[-1], np.arange(start, min(tokens, start + per_file)), vocab_size=50257)
    (path / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "vocab_size": 50257,
                                                "splits": {"train": {"files": files, "tokens": tokens}}}))
    return TokenWindows(path, "train", SEQ)


def steps(loaders, n):
    """n steps of all ranks together, each as the first ids of its samples in rank order."""
    return [[int(x[i, 0]) for ld in loaders for x, _ in ld.next_step() for i in range(len(x))] for _ in range(n)]


@pytest.mark.parametrize("n", [1, 2, 3, 16, 17, 1000, 4097, 65_537])
def test_the_order_of_an_epoch_visits_every_window_once(n):
    assert np.array_equal(np.sort(shuffle(np.arange(n), n, seed=7, epoch=3)), np.arange(n))


def test_the_order_is_fixed_by_seed_and_epoch_and_differs_between_them():
    base = shuffle(np.arange(1000), 1000, seed=1, epoch=0)
    assert np.array_equal(base, shuffle(np.arange(1000), 1000, seed=1, epoch=0))
    assert not np.array_equal(base, shuffle(np.arange(1000), 1000, seed=2, epoch=0))
    assert not np.array_equal(base, shuffle(np.arange(1000), 1000, seed=1, epoch=1))
    assert not np.array_equal(base, np.arange(1000))


def test_a_micro_batch_straddling_an_epoch_boundary_takes_each_side_from_its_own_epoch():
    w = window_indices(995, 10, 1000, seed=4)
    assert np.array_equal(w[:5], shuffle(np.arange(995, 1000), 1000, 4, 0))
    assert np.array_equal(w[5:], shuffle(np.arange(0, 5), 1000, 4, 1))


def test_the_order_far_into_a_9b_token_run_costs_no_table():
    """Sample 10**12 of a run over 8.8M windows (9B tokens at seq_len 1024) is computed directly."""
    w = window_indices(10**12, 12, 8_789_062, seed=1337)
    assert len(set(w.tolist())) == 12 and (0 <= w).all() and (w < 8_789_062).all()


def test_data_parallel_ranks_split_each_global_batch_without_overlap(tmp_path):
    windows = numbered_dataset(tmp_path / "d")
    single = DataLoader(windows, micro_batch=2, global_batch=8, seed=3, workers=0)
    ranks = [DataLoader(windows, micro_batch=2, global_batch=8, dp_rank=r, dp_size=2, seed=3, workers=0)
             for r in (0, 1)]
    assert steps([single], 3) == steps(ranks, 3)


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_the_batches_do_not_depend_on_workers_or_read_ahead(workers, tmp_path):
    windows = numbered_dataset(tmp_path / "d")
    plain = DataLoader(windows, micro_batch=2, global_batch=8, seed=3, workers=0)
    served = DataLoader(windows, micro_batch=2, global_batch=8, seed=3, workers=workers, prefetch_steps=3)
    a, b = plain.next_step(), served.next_step()
    assert all(np.array_equal(x1, x2) and np.array_equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert np.array_equal(a[0][1][:, :-1], a[0][0][:, 1:])  # targets are the inputs shifted by one


@pytest.mark.parametrize("before, after", [(1, 1), (2, 2), (2, 1), (2, 4)])
@pytest.mark.parametrize("at", ["mid-epoch", "next-epoch"])
def test_a_resumed_loader_continues_the_uninterrupted_order_with_batches_read_ahead(before, after, at, tmp_path):
    """Save after some steps while the workers hold batches read ahead (2 workers, 3 steps ahead),
    resume on as many or another number of data-parallel ranks: every following step, across the
    next epoch boundary, equals the uninterrupted single-rank run."""
    windows = numbered_dataset(tmp_path / "d")
    epoch_steps = windows.num_windows // 8  # 499 windows: the epochs do not fall on step boundaries
    saved_at = 5 if at == "mid-epoch" else epoch_steps + 3
    whole = steps([DataLoader(windows, 2, 8, seed=5, workers=0)], saved_at + epoch_steps + 2)
    first = [DataLoader(windows, 2, 8, dp_rank=r, dp_size=before, seed=5, workers=2, prefetch_steps=3)
             for r in range(before)]
    assert steps(first, saved_at) == whole[:saved_at]
    states = [ld.state_dict() for ld in first]
    assert all(s == {"position": 8 * saved_at, "seed": 5, "seq_len": SEQ} for s in states)
    resumed = [DataLoader(windows, 2, 8, dp_rank=r, dp_size=after, seed=5, workers=2, prefetch_steps=3)
               for r in range(after)]
    for ld in resumed:
        ld.load_state_dict(states[0])
    assert steps(resumed, epoch_steps + 2) == whole[saved_at:]


def test_a_loader_resumed_in_place_drops_what_it_had_read_ahead(tmp_path):
    windows = numbered_dataset(tmp_path / "d")
    ld = DataLoader(windows, 2, 8, seed=5, workers=1, prefetch_steps=2)
    whole = steps([DataLoader(windows, 2, 8, seed=5, workers=0)], 6)
    steps([ld], 4)
    ld.load_state_dict({"position": 8, "seed": 5, "seq_len": SEQ})
    assert steps([ld], 5) == whole[1:]


@pytest.mark.parametrize("workers", [0, 1])
def test_starting_the_loader_leaves_the_global_rng_alone(workers, tmp_path):
    """Dropout draws from the global RNG, restored exactly on resume; a loader started after the
    resume must not take a draw from it that the uninterrupted run took before the save."""
    import torch
    ld = DataLoader(numbered_dataset(tmp_path / "d"), 2, 8, seed=5, workers=workers)
    torch.manual_seed(0)
    ld.next_step()
    after_start = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after_start, torch.rand(3))


def test_token_windows_pickle_by_path_not_by_content(tmp_path):
    """A worker started by spawn or forkserver receives the windows pickled: the file names, not
    the tokens."""
    windows = numbered_dataset(tmp_path / "d", tokens=200_000, per_file=100_000)
    blob = pickle.dumps(windows)
    assert len(blob) < 10_000
    assert np.array_equal(pickle.loads(blob).window(12_345), windows.window(12_345))


# In a training run: the loader's worker processes meet signals and failures.

def start_training(data_root, run_dir, *extra):
    """A single-process run in its own process group (with its loader workers), open-ended."""
    args = tiny_args(data_root, run_dir, "--train.eval_every=0", "--logging.every=1", "--train.max_steps=100000",
                     "--checkpoint.every=1000", "--logging.sample_tokens=0", *extra)
    return subprocess.Popen([sys.executable, "-m", "scaling.train", *map(str, args)], cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_steps(p, run_dir, n, timeout=120):
    deadline = time.time() + timeout
    while sum("loss" in r for r in read_metrics(run_dir)) < n if (run_dir / "metrics.jsonl").is_file() else True:
        assert p.poll() is None, p.communicate()[0]
        assert time.time() < deadline
        time.sleep(0.01)


def children(pid):
    return [int(c) for t in Path(f"/proc/{pid}/task").glob("*") for c in (t / "children").read_text().split()]


def test_sigterm_to_every_process_of_a_run_saves_and_exits_for_a_requeue(data_root, tmp_path):
    """A scheduler's SIGTERM reaches the loader workers too: they ignore it, so the run still
    saves its step and exits with the requeue code, instead of failing on a dead worker."""
    p = start_training(data_root, tmp_path)
    wait_for_steps(p, tmp_path, 3)
    assert children(p.pid), "the loader has a worker process"
    os.killpg(p.pid, signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == EXIT_PREEMPTED and "Traceback" not in out, out
    assert step_of(checkpoints(tmp_path)[-1]) >= 3


# Where the kill lands varies (a torch error, EOF, a reset): three tries here, eight in the slow tier.
@pytest.mark.parametrize("attempt", [pytest.param(k, marks=pytest.mark.slow) if k >= 3 else k for k in range(8)])
def test_a_killed_loader_worker_stops_the_run_with_one_line_and_exit_1(attempt, data_root, tmp_path):
    p = start_training(data_root, tmp_path)
    wait_for_steps(p, tmp_path, 3)
    os.kill(children(p.pid)[0], signal.SIGKILL)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 1 and "Traceback" not in out, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: rank 0: the data loader's worker process died (") and "pid" in last, out
    assert "killed by" in last.lower(), out


SLOW_READ_MS = 2


def test_data_ms_holds_the_reads_of_a_step_read_in_the_training_process(data_root, tmp_path, monkeypatch):
    """Without workers the step reads its own windows, 2 ms each (a slow filesystem): data_ms
    holds at least that much. A lower bound: a busy machine only adds to it."""
    from scaling.train import train
    rows = TokenWindows.rows

    def slow_rows(self, ws):
        time.sleep(SLOW_READ_MS * len(ws) / 1e3)
        return rows(self, ws)
    monkeypatch.setattr(TokenWindows, "rows", slow_rows)
    cfg = load_config(TINY, [f"--data.root={data_root}", f"--logging.run_dir={tmp_path}", "--data.workers=0",
                             "--train.max_steps=8", "--logging.every=4", "--train.eval_every=0",
                             "--logging.sample_tokens=0"])
    train(cfg)
    last = [r for r in read_metrics(tmp_path) if "loss" in r][-1]
    assert last["data_ms"] >= SLOW_READ_MS * cfg.train.micro_batch_size, last


class LoggedWindows(TokenWindows):
    """Windows that note, in a file, which process read which step (by its first window)."""
    log: str

    def rows(self, ws):
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {int(ws[0])}\n")
        return super().rows(ws)


def test_a_worker_reads_the_next_steps_while_training_holds_the_current_one(tmp_path):
    """The behaviour data_ms rests on: once a step is handed to training, the worker process has
    already read it and goes on to read the following prefetch_steps steps without being asked."""
    windows = numbered_dataset(tmp_path / "d")
    windows.__class__, windows.log = LoggedWindows, str(tmp_path / "reads")
    ld = DataLoader(windows, 2, 8, seed=5, shuffle=False, workers=1, prefetch_steps=2)
    try:
        first = [int(x[0, 0]) for x, _ in ld.next_step()][0]
        deadline = time.time() + 60  # a bound for a stalled worker, not a speed requirement
        while len(Path(windows.log).read_text().splitlines()) < 3:
            assert time.time() < deadline, Path(windows.log).read_text()
            time.sleep(0.01)
        reads = [(int(pid), int(w)) for pid, w in (line.split() for line in Path(windows.log).read_text().splitlines())]
        assert first == 0 and [w for _, w in reads[:3]] == [0, 8, 16]  # step 1, then steps 2 and 3 unasked
        assert all(pid != os.getpid() for pid, _ in reads)  # read by the worker, not by training
    finally:
        ld.close()


STUCK_WORKER = """
import gc, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_loader import numbered_dataset
from scaling.data import TokenWindows
from scaling.loader import DataLoader

class Stuck(TokenWindows):  # a read that never ends (a hung network filesystem), after the first steps
    def rows(self, ws):
        if Path({flag!r}).exists():
            time.sleep(600)
        return super().rows(ws)

windows = numbered_dataset(Path({data!r}))
windows.__class__ = Stuck
ld = DataLoader(windows, 2, 8, seed=5, workers=1, prefetch_steps=2)
ld.next_step()
Path({flag!r}).touch()
ld.next_step()  # the worker now reads ahead, and hangs
time.sleep(0.5)
if {collect!r}:
    del ld
    gc.collect()  # the loader goes without close(): its worker is left to the exit hook
print("exiting", flush=True)
"""


@pytest.mark.parametrize("collect", [False, True], ids=["open", "collected"])
def test_a_process_exits_even_when_its_loader_worker_hangs(collect, tmp_path):
    """A worker ignores SIGTERM, which is how multiprocessing stops workers at exit: a hung one
    would hold the process forever. The loader's exit hook kills it after torch's 5 s grace."""
    script = STUCK_WORKER.format(tests=str(ROOT / "tests"), flag=str(tmp_path / "hang"), data=str(tmp_path / "d"),
                                 collect=collect)
    # The stuck read lasts 600 s: a process that waited for it runs into this timeout and fails.
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "exiting" in p.stdout, p.stderr

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
from scaling.loader import DataLoader, epoch_offset, shuffle, window_indices

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
    assert windows.num_windows % 8  # 498 windows: the epochs do not fall on step boundaries
    epoch_steps = windows.num_windows // 8
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


# Each epoch reads its windows at its own offset into the files; validation's windows stay put.

def epochs(windows, seed, n, shuffle=True):
    """The first n epochs as read by a loader whose step is one whole epoch, each as rows of ids."""
    per_epoch = windows.shifted(0).num_windows if shuffle else windows.num_windows
    ld = DataLoader(windows, per_epoch, per_epoch, seed=seed, shuffle=shuffle, workers=0)
    return [whole_rows(*ld.next_step()[0]) for _ in range(n)]


def whole_rows(x, y):
    """A micro batch's rows of seq_len + 1 ids, as read."""
    return np.concatenate([x[:, :1].numpy(), y.numpy()], axis=1)


def numbered_files(path, sizes):
    """numbered_dataset with files of the given sizes: ids 0, 1, 2, ... across them."""
    path.mkdir(parents=True)
    ends = np.cumsum(sizes)
    for k, (size, end) in enumerate(zip(sizes, ends)):
        write_tokens(path / f"train_{k:06d}.bin", np.arange(end - size, end), vocab_size=50257)
    (path / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "vocab_size": 50257, "splits": {
        "train": {"files": [f"train_{k:06d}.bin" for k in range(len(sizes))], "tokens": int(ends[-1])}}}))
    return TokenWindows(path, "train", SEQ), ends


def test_each_epoch_starts_its_windows_at_another_offset_into_the_files(tmp_path):
    windows = numbered_dataset(tmp_path / "d")  # files of 1500 tokens: an id's place in its file is id % 1500
    first, second = ({int(i) % 1500 % SEQ for i in rows[:, 0]} for rows in epochs(windows, seed=5, n=2))
    assert len(first) == len(second) == 1 and first != second


def test_the_offsets_of_seq_len_consecutive_epochs_are_all_different():
    assert sorted(epoch_offset(5, e, 64) for e in range(64)) == list(range(64))
    assert sorted(epoch_offset(5, e, 64) for e in range(64, 128)) == list(range(64))


def test_the_offset_of_an_epoch_is_a_pure_function_of_seed_and_epoch():
    """Every rank computes it, and a resumed run from any position: no state, no global RNG."""
    import random
    import torch
    offsets = [epoch_offset(5, e, 64) for e in range(200)]
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    assert [epoch_offset(5, e, 64) for e in reversed(range(200))] == offsets[::-1]
    assert [epoch_offset(6, e, 64) for e in range(200)] != offsets


def test_an_epoch_reads_every_token_of_a_file_once_but_for_one_window_at_its_ends(tmp_path):
    """Over seq_len epochs (every offset once): no token is read twice in an epoch, and what an
    epoch leaves out of a file lies at its ends and is at most one window more than the fixed
    windows leave out."""
    windows = numbered_dataset(tmp_path / "d")
    for rows in epochs(windows, seed=5, n=SEQ):
        inputs = rows[:, :-1].ravel()
        assert len(np.unique(inputs)) == len(inputs)
        for start, end in ((0, 1500), (1500, 3000), (3000, 4000)):
            read = np.sort(inputs[(start <= inputs) & (inputs < end)])
            assert np.array_equal(read, np.arange(read[0], read[0] + len(read)))  # one stretch
            fixed = (end - start - 1) // SEQ * SEQ  # the inputs of the fixed windows
            assert (end - start) - len(read) <= (end - start - fixed) + SEQ


def test_validation_windows_stay_where_they_are_while_training_shifts_its_epochs(tmp_path):
    """Validation and eval read TokenWindows.window: the fixed windows, at multiples of seq_len,
    all of them, and still there after a training loader read two shifted epochs from them."""
    windows = numbered_dataset(tmp_path / "d")
    fixed = [windows.window(w) for w in range(windows.num_windows)]
    assert len(fixed) == 187 + 187 + 124 and all(int(w[0]) % 1500 % SEQ == 0 for w in fixed)
    epochs(windows, seed=5, n=2)
    assert windows.num_windows == len(fixed)
    assert all(np.array_equal(windows.window(w), f) for w, f in enumerate(fixed))


def test_the_unshuffled_order_reads_the_fixed_windows_in_every_epoch(tmp_path):
    windows = numbered_dataset(tmp_path / "d")
    fixed = np.stack([windows.window(w) for w in range(windows.num_windows)])
    assert all(np.array_equal(rows, fixed) for rows in epochs(windows, seed=5, n=2, shuffle=False))


def test_a_step_spanning_two_epochs_reads_each_side_at_its_own_offset(tmp_path):
    windows = numbered_dataset(tmp_path / "d", tokens=4_010)  # 497 windows: epoch 0 ends inside step 63
    first, second = epochs(windows, seed=5, n=2)
    ld = DataLoader(windows, 2, 8, seed=5, workers=0)
    read = [i for step in steps([ld], 2 * len(first) // 8) for i in step]
    assert read == [int(i) for i in np.concatenate([first[:, 0], second[:, 0]])[:len(read)]]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_a_resume_at_a_step_spanning_two_epochs_continues_the_uninterrupted_order(before, after, tmp_path):
    windows = numbered_dataset(tmp_path / "d", tokens=4_010)  # 497 windows: epoch 0 ends inside step 63
    at = windows.shifted(0).num_windows // 8  # saved after 62 steps; the next one spans the epochs
    whole = steps([DataLoader(windows, 2, 8, seed=5, workers=0)], at + 3)
    first = [DataLoader(windows, 2, 8, dp_rank=r, dp_size=before, seed=5, workers=0) for r in range(before)]
    assert steps(first, at) == whole[:at]
    resumed = [DataLoader(windows, 2, 8, dp_rank=r, dp_size=after, seed=5, workers=0) for r in range(after)]
    for ld in resumed:
        ld.load_state_dict(first[0].state_dict())
    assert steps(resumed, 3) == whole[at:]


@pytest.mark.parametrize("sizes", [[9], [9, 12, 17, 5]], ids=["one-window", "short-files"])
def test_files_of_fewer_than_two_windows_are_still_read_as_whole_windows(sizes, tmp_path):
    """A file of one window has little or no room to move (9 tokens: none; 12: 3 tokens); one of
    5 tokens holds none. Every window read stays whole and inside its file, epoch after epoch
    (a step of 8 spans several epochs here), and every file that holds a window is read."""
    windows, ends = numbered_files(tmp_path / "d", sizes)
    ld = DataLoader(windows, 2, 8, seed=5, workers=0)
    files = set()
    for _ in range(12):
        for x, y in ld.next_step():
            for row in whole_rows(x, y):
                assert np.array_equal(row, np.arange(row[0], row[0] + SEQ + 1))
                f = int(np.searchsorted(ends, row[0], side="right"))
                assert f == np.searchsorted(ends, row[-1], side="right")
                files.add(f)
    assert files == {f for f, size in enumerate(sizes) if size > SEQ}


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


@pytest.mark.parametrize("collect", [pytest.param(False, marks=pytest.mark.slow), True], ids=["open", "collected"])
def test_a_process_exits_even_when_its_loader_worker_hangs(collect, tmp_path):
    """A worker ignores SIGTERM, which is how multiprocessing stops workers at exit: a hung one
    would hold the process forever. The loader's exit hook kills it after torch's 5 s grace."""
    script = STUCK_WORKER.format(tests=str(ROOT / "tests"), flag=str(tmp_path / "hang"), data=str(tmp_path / "d"),
                                 collect=collect)
    # The stuck read lasts 600 s: a process that waited for it runs into this timeout and fails.
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "exiting" in p.stdout, p.stderr

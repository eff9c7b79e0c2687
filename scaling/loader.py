"""The training loader: which windows each rank reads at each step, served in the background.

Order. Sample i of the run (counted over all data-parallel ranks together) is window
order(i mod W) of epoch e = i div W, where order is a bijection of [0, W) chosen by (seed, e): a
keyed Feistel network computed per index (see `shuffle`). Nothing is drawn or stored per epoch,
so a 9B-token dataset starts as fast as a small one, and the loader's whole state is one number,
the global position: a resumed run continues with exactly the next sample, on any number of
ranks.

Contexts. Epoch e reads its windows starting epoch_offset(seed, e) tokens into each token file
(TokenWindows.shifted), so the boundaries of the contexts move between epochs, as nanoGPT's
random offsets do. Every token is still read at most once per epoch; at the ends of each file
an epoch leaves out at most one window's worth more than the fixed windows do (the slack that
keeps W the same in every epoch). Validation and eval read the fixed windows, which never move.

Serving. Each rank reads its share of each step through torchdata's StatefulDataLoader: worker
processes read and stack the windows of whole steps ahead of training (`data.workers`,
`data.prefetch_steps`), its pin-memory thread pins them on CUDA, and the loader copies the next
step's rows to the device on a side stream while the current step computes. The position saved in
a checkpoint is the one torchdata recorded when the last step handed to training was produced;
steps read ahead but not yet used are read again after a resume.
"""

import atexit
import signal
import warnings
import weakref

import numpy as np
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from scaling.data import DataError, TokenWindows

# torchdata 0.11 calls torch.set_vital, deprecated in torch 2.13: one warning per loader, nothing to act on.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")

MASK64 = (1 << 64) - 1
ROUNDS = 4  # a 4-round Feistel network with a pseudorandom round function is a strong pseudorandom permutation


def _splitmix(x: int) -> int:
    """SplitMix64's finaliser on a Python int: a well-mixed 64-bit key from a small number."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def _mix(x: np.ndarray) -> np.ndarray:
    """The same finaliser over a uint64 array (multiplication wraps modulo 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shuffle(j: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """Positions j in [0, n) mapped through a bijection of [0, n) chosen by (seed, epoch).

    A balanced Feistel network permutes the 2h-bit numbers, 4**h >= n (at most 4n of them); a
    value it sends past n is sent through it again until it lands inside (cycle walking), which
    keeps the map a bijection of [0, n). Cost: a few dozen integer operations per index."""
    if n == 1:
        return np.zeros_like(j)
    half = ((n - 1).bit_length() + 1) // 2
    mask = np.uint64((1 << half) - 1)
    keys = [np.uint64(_splitmix(_splitmix(_splitmix(seed & MASK64) ^ epoch) ^ r)) for r in range(ROUNDS)]
    x = np.asarray(j, dtype=np.uint64).copy()
    todo = np.ones(x.shape, dtype=bool)
    with np.errstate(over="ignore"):
        while todo.any():
            left, right = x[todo] >> np.uint64(half), x[todo] & mask
            for k in keys:
                left, right = right, left ^ (_mix(right ^ k) & mask)
            x[todo] = (left << np.uint64(half)) | right
            todo = x >= np.uint64(n)
    return x.astype(np.int64)


OFFSETS = 0x6F666673657473  # keys the epochs' offsets apart from their orders


def epoch_offset(seed: int, epoch: int, seq_len: int) -> int:
    """Where the windows of an epoch start in each token file, in [0, seq_len). Each block of
    seq_len consecutive epochs (0 .. seq_len - 1, then the next) takes the offsets in an order
    chosen by (seed, block), so no offset repeats within a block: a run of fewer epochs than
    seq_len never reads the same contexts twice. A pure function of (seed, epoch), like the
    order: every rank and every resumed run compute the same one."""
    block, k = divmod(epoch, seq_len)
    return int(shuffle(np.array([k]), seq_len, seed ^ OFFSETS, block)[0])


def window_indices(first: int, count: int, num_windows: int, seed: int, shuffled: bool = True) -> np.ndarray:
    """The windows of samples first .. first + count - 1 of the run."""
    i = np.arange(first, first + count, dtype=np.int64)
    epoch, j = np.divmod(i, num_windows)
    if not shuffled:
        return j
    if epoch[0] == epoch[-1]:
        return shuffle(j, num_windows, seed, int(epoch[0]))
    out = np.empty_like(j)
    for e in np.unique(epoch):  # a micro batch may straddle an epoch boundary
        at = epoch == e
        out[at] = shuffle(j[at], num_windows, seed, int(e))
    return out


class RankSteps(torch.utils.data.Dataset):
    """Item `position` is this rank's share of the step that starts at that global position:
    samples position + r * local .. + local - 1 for rank r, as one tensor of int64 rows of
    seq_len + 1 ids (one transfer per step from a worker, split into micro batches later). A
    pure function of the position, so any worker can read any step."""

    def __init__(self, windows: TokenWindows, local: int, dp_rank: int, seed: int, shuffled: bool):
        self.windows, self.local, self.dp_rank, self.seed, self.shuffled = windows, local, dp_rank, seed, shuffled
        # The shifted windows number the same at every offset: the epoch arithmetic holds.
        self.num_windows = windows.shifted(0).num_windows if shuffled else windows.num_windows

    def __getitem__(self, position: int) -> torch.Tensor | Exception:
        first = position + self.dp_rank * self.local
        ws = window_indices(first, self.local, self.num_windows, self.seed, self.shuffled)
        try:
            if not self.shuffled:
                # Unshuffled, the split is read front to back in the fixed windows (eval's), the
                # same in every epoch: a reference order in which window j always names the same
                # tokens, for tests and debugging. Training runs shuffled.
                return torch.from_numpy(self.windows.rows(ws.tolist()))
            epochs = np.arange(first, first + self.local) // self.num_windows
            seq_len = self.windows.seq_len
            return torch.from_numpy(np.concatenate([  # a step may span epochs: each reads at its own offset
                self.windows.shifted(epoch_offset(self.seed, int(e), seq_len)).rows(ws[epochs == e].tolist())
                for e in np.unique(epochs)]))
        except (DataError, OSError) as e:
            # Returned, not raised: torch would re-raise it in the training process wrapped in
            # the worker's traceback; as an item it arrives as itself, a one-line error.
            return e


class StepSampler(torch.utils.data.Sampler):
    """The global positions of the steps from `position` on, without end. Its state is the
    position of the next step, the same on every rank: a run may resume on another number of
    ranks."""

    def __init__(self, position: int, global_batch: int):
        self.position, self.global_batch = position, global_batch

    def __iter__(self):
        return self

    def __next__(self) -> int:
        self.position += self.global_batch
        return self.position - self.global_batch

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict):
        self.position = state["position"]


def _position(loader_state: dict) -> int:
    """The global position after the last batch StatefulDataLoader handed out, from its state.
    With worker processes the state is a snapshot taken as that batch arrived, not the sampler's
    live state (which is ahead by every index already sent to a worker)."""
    main = loader_state["_snapshot"]["_main_snapshot"] if "_snapshot" in loader_state else loader_state
    return main["_sampler_iter_state"]["position"]


class WorkerFailed(RuntimeError):
    """A loader worker process died: a failure of the run, not bad input."""


def worker_death(e: BaseException) -> str | None:
    """The one line for a loader worker's death, whichever way it surfaced (None if e is not one):
    torch's SIGCHLD handler raises its RuntimeError wherever the training process happens to be
    (in the backward, say); a transfer cut short raises EOFError or a reset in next_step."""
    if isinstance(e, WorkerFailed):
        return str(e)
    if isinstance(e, RuntimeError) and "DataLoader worker" in str(e):
        return f"the data loader's worker process died ({str(e).strip().splitlines()[0][:200]})"
    return None


def _quiet_worker(worker_id: int):
    """A worker ignores the signals meant for training (a scheduler's SIGTERM to every process,
    Ctrl-C to the process group): killed, it would raise an error in the training process in the
    middle of the save that signal asked for. Workers still exit with it (they watch their parent)."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


_LOADERS = weakref.WeakSet()  # started and not closed
_WORKERS = []  # every worker process started here, for the exit hook


@atexit.register  # registered after multiprocessing's own hook, so it runs before it
def _stop_workers_at_exit():
    """multiprocessing's exit hook stops a worker with SIGTERM and then waits for it: a worker
    ignores SIGTERM (see _quiet_worker), so that would wait forever. Close what is open, then
    kill what is left (a worker whose loader was collected without stopping it)."""
    for loader in list(_LOADERS):
        loader.close()
    for w in _WORKERS:
        if w.is_alive():
            w.kill()
            w.join(1)


class DataLoader:
    """Batches for one data-parallel rank, in an order fixed by (seed, global position).

    next_step() returns the micro batches (x, y) of the next optimizer step, already on the device;
    the following step's batches are already being read (workers) and copied (side stream).
    Implements the Stateful protocol (state_dict / load_state_dict) for checkpoints.
    """

    def __init__(self, windows: TokenWindows, micro_batch: int, global_batch: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, shuffle: bool = True, device="cpu", workers: int = 1,
                 prefetch_steps: int = 2):
        assert global_batch % (micro_batch * dp_size) == 0
        self.windows, self.micro_batch, self.global_batch = windows, micro_batch, global_batch
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self.device = torch.device(device)
        self.workers, self.prefetch_steps = workers, prefetch_steps
        self.position = 0  # global sample index of the next step handed to training
        # torch.cpu's streams are no-ops: the CPU runs this same code.
        self.streams = torch.get_device_module(self.device)
        self.copy_stream = self.streams.Stream(self.device) if self.device.type == "cuda" else self.streams.current_stream()
        self._it, self._ahead = None, None

    def _start(self):
        """A fresh StatefulDataLoader from self.position (after construction or a resume)."""
        steps = RankSteps(self.windows, self.global_batch // self.dp_size, self.dp_rank, self.seed, self.shuffle)
        loader = StatefulDataLoader(
            steps, batch_size=None, sampler=StepSampler(self.position, self.global_batch),
            num_workers=self.workers, prefetch_factor=-(-self.prefetch_steps // self.workers) if self.workers else None,
            pin_memory=self.device.type == "cuda", worker_init_fn=_quiet_worker if self.workers else None,
            # Its own generator: by default starting an iterator draws a worker seed from the global
            # RNG, which would shift the dropout stream of a resumed run against an uninterrupted one.
            generator=torch.Generator().manual_seed(self.seed), snapshot_every_n_steps=1)
        self._it = iter(loader)
        _LOADERS.add(self)
        _WORKERS.extend(getattr(self._it, "_workers", []))

    def _fetch(self):
        """The next step's rows with their copy to the device issued on the side stream, and the
        global position after that step as torchdata recorded it."""
        try:
            rows = next(self._it)
        except (EOFError, ConnectionError, RuntimeError) as e:
            failure = self._worker_failure(e)
            if failure is not e:
                self.close()  # also takes the workers off torch's SIGCHLD check, which would raise again
            raise failure from e
        if isinstance(rows, Exception):
            raise rows
        position = _position(self._it.state_dict())
        with self.streams.stream(self.copy_stream):
            return rows.to(self.device, non_blocking=True), position

    def _worker_failure(self, e: Exception) -> Exception:
        """A worker that died (out of memory, killed) surfaces as whatever the transfer of its
        last batch hit: torch's RuntimeError, an EOFError or a reset connection. Name it."""
        workers = getattr(self._it, "_workers", [])
        if not (workers and isinstance(e, (EOFError, ConnectionError))) and "DataLoader worker" not in str(e):
            return e  # not a worker's death
        for w in workers:  # the transfer broke as the worker died: let the kernel finish with it
            w.join(timeout=2)
        how = ", ".join(f"pid {w.pid}, " + (f"killed by {signal.Signals(-w.exitcode).name}" if w.exitcode < 0
                        else f"exit code {w.exitcode}") for w in workers if w.exitcode is not None)
        return WorkerFailed(f"the data loader's worker process died ({how or str(e).splitlines()[0][:200]}; "
                            "out of memory?)")

    def next_step(self):
        """The micro batches (x, y) of this rank for the next optimizer step."""
        if self._it is None:
            self._start()
            self._ahead = self._fetch()
        rows, self.position = self._ahead
        # The compute waits for this step's copy (issued a step ago), not for the next one's,
        # which is issued after this point and runs on the side stream while this step computes.
        self.streams.current_stream().wait_stream(self.copy_stream)
        if self.device.type == "cuda":  # made on the side stream, used and freed on this one
            rows.record_stream(self.streams.current_stream())
        self._ahead = self._fetch()
        return [(xy[:, :-1], xy[:, 1:]) for xy in rows.split(self.micro_batch)]

    def close(self):
        """Stop the workers: told to finish (torch waits up to 5 s), then killed if still there
        (they ignore the SIGTERM torch would send next)."""
        if self._it is not None and hasattr(self._it, "_shutdown_workers"):
            self._it._shutdown_workers()
            for w in self._it._workers:
                if w.is_alive():
                    w.kill()
                    w.join(1)
        _LOADERS.discard(self)
        self._it, self._ahead = None, None

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "seq_len": self.windows.seq_len}

    def load_state_dict(self, state: dict):
        if state["seq_len"] != self.windows.seq_len:
            raise DataError(f"checkpoint was taken with seq_len {state['seq_len']}, "
                            f"this run uses {self.windows.seq_len}")
        self.position, self.seed = int(state["position"]), int(state["seed"])
        self.close()  # what was read ahead belongs to the old position

"""Process-group set-up: one code path for a single process, torchrun and Slurm.

torchrun and our Slurm launcher both export RANK, LOCAL_RANK and WORLD_SIZE; without them this
is a single process, with a process group of one held in memory. NCCL carries the collectives on GPUs,
gloo on CPUs (every collective the parallel layouts need runs on gloo, so all of them are
testable without a GPU).
"""

import contextlib
import ctypes
import datetime
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from scaling.errors import ConfigError


@dataclass
class Env:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The world size the launcher announced, known before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size() -> int | None:
    """Processes on this node, as torchrun announces it (None outside torchrun)."""
    n = os.environ.get("LOCAL_WORLD_SIZE")
    return int(n) if n else None


def pick_device(name: str, local_rank: int = 0, tf32: bool = True) -> torch.device:
    """The device; on CUDA, fp32 matmuls in TF32 unless tf32 is False (CPU numerics untouched)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device: cuda, but no CUDA device is available")
        # TF32 keeps fp32's range with a 10-bit mantissa on tensor cores: several times faster fp32
        # matmuls on A100/H100 (nanoGPT and torchtitan turn it on too). bf16 runs are unaffected.
        # (allow_tf32, not fp32_precision: torch raises when a legacy getter such as
        # get_float32_matmul_precision(), which compilers read, meets the new API's settings.)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init(device_name: str = "auto", timeout_s: float = 600, tf32: bool = True) -> Env:
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank, tf32)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    n = world_size()
    if not dist.is_initialized():
        # On GPUs, CPU tensors (a few DCP and loader bookkeeping ops) still need gloo. A single
        # process gets a group of one too: its model is wrapped like every layout's (FSDP's
        # mixed precision over a one-rank mesh), so one code path serves every world size.
        backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
        store = {"store": dist.HashStore(), "rank": 0, "world_size": 1} if n == 1 else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None, **store)
    return Env(rank, local_rank, n, device)


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor, group=None) -> torch.Tensor:
    """Mean of x over the group (all ranks by default); x itself when single process."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        x /= dist.get_world_size(group)
    return x


# What each link carries per byte of the message, as nccl-tests' busbw counts it on n ranks.
BUS_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
              "reduce_scatter": lambda n: (n - 1) / n}


def time_collective(op: str, nbytes: int, device: torch.device, iters: int = 10, warmup: int = 3) -> dict:
    """One collective on an nbytes fp32 message over the whole world, timed on every rank:
    seconds per call, algorithm bandwidth (bytes / time) and bus bandwidth (algbw x BUS_FACTOR),
    in GB/s. The bench's interconnect table and the preflight's bandwidth check both use it."""
    n = dist.get_world_size()
    x, part = torch.ones(nbytes // 4, device=device), torch.empty(nbytes // 4 // n, device=device)
    # all_gather_into_tensor / reduce_scatter_tensor: in every torch we support (the *_single
    # forms are newer than torch 2.11, the GPU image's).
    call = {"all_reduce": lambda: dist.all_reduce(x), "all_gather": lambda: dist.all_gather_into_tensor(x, part),
            "reduce_scatter": lambda: dist.reduce_scatter_tensor(part, x)}[op]
    for _ in range(warmup):
        call()
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / iters
    algbw = nbytes / seconds / 1e9
    return {"op": op, "bytes": nbytes, "time_us": seconds * 1e6, "algbw_gbps": algbw,
            "busbw_gbps": algbw * BUS_FACTOR[op](n)}


def is_comm_failure(e: BaseException) -> bool:
    """A collective that failed because another rank died or hangs: gloo raises a plain
    RuntimeError naming itself ("Timed out waiting ...", "Connection closed by peer")."""
    return isinstance(e, dist.DistError) or (
        isinstance(e, RuntimeError) and any(w in str(e) for w in ("gloo", "NCCL", "Timed out", "Connection closed")))


def kill_stopped_siblings():
    """SIGKILL this node's other torchrun workers that are stopped (SIGSTOP, a debugger, a frozen
    job-control group). Called when a collective failed: a stopped worker cannot time out,
    save, report or even take torchrun's SIGTERM, so torchrun would wait its whole shutdown grace
    (30 s, more under the Slurm launcher) on it before ending the job."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    me, parent = os.getpid(), os.getppid()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]  # the name may hold spaces
            pid = int(stat.parent.name)
            if int(ppid) == parent and pid != me and state in ("T", "t"):
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):  # gone meanwhile, or not ours to signal
            continue


class FollowerExit(Exception):
    """Rank 0 failed a decision that every rank waited for, and reported it: this rank exits
    quietly with the same code, so the user reads the reason once."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def on_rank0(fn):
    """Run fn on rank 0 alone and give its result to every rank. If it raises, rank 0 raises
    the same exception and the other ranks raise FollowerExit (none is left waiting)."""
    if not dist.is_initialized():
        return fn()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", fn())]
        except Exception as e:
            code = getattr(e, "exit_code", 2 if isinstance(e, ValueError) else 1)
            dist.broadcast_object_list([("error", code)], src=0)
            raise
    dist.broadcast_object_list(box, src=0)  # on CPU through gloo, also on GPU nodes
    kind, value = box[0]
    if kind == "error":
        raise FollowerExit(value)
    return value


# Exit code of a run stopped by SIGTERM / SIGUSR1 after saving: "try again later" (sysexits.h
# EX_TEMPFAIL). The Slurm launcher requeues a job that ends with it.
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT) after saving: the shell's code for an interrupted command
EXIT_DIR = "SCALING_EXIT_DIR"  # where scaling.launch collects the workers' marks of a clean stop


def exit_code(signal_name: str | None) -> int:
    """The exit code of a run that a signal stopped after saving: 130 for Ctrl-C, else 75."""
    return EXIT_INTERRUPTED if signal_name == "SIGINT" else EXIT_PREEMPTED


def mark_preempted(code: int = EXIT_PREEMPTED):
    """Tell scaling.launch (if it started this worker) that this rank saved and stops cleanly
    with this exit code."""
    if folder := os.environ.get(EXIT_DIR):
        with contextlib.suppress(OSError):
            (Path(folder) / f"rank{rank()}").write_text(str(code))


PR_SET_PDEATHSIG = 1  # prctl(2): a signal the kernel sends this process when its parent dies


def _signal_on_parent_death(sig: int) -> bool:
    """Ask Linux for `sig` when the process that started this one dies; False where unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        return False


class StopSignal:
    """Remembers SIGTERM / SIGUSR1 (what Slurm sends before a time limit or a preemption) and
    SIGINT (Ctrl-C; torchrun passes it on to its workers) so the loop can stop at a step boundary,
    save and exit instead of dying mid-step. A second Ctrl-C exits at once, saving nothing more:
    a save cut short is a .tmp folder, never a checkpoint, so the ones before stay intact. restore() puts back the handlers
    it replaced: a run inside a notebook or a test leaves no handler behind (a Python handler is
    inherited by forked children, where it can keep SIGTERM from ending them).

    Under torchrun a worker also asks for SIGTERM when torchrun dies: torchrun starts each worker
    in a session of its own, so a launcher killed with SIGKILL (the OOM killer, `kill -9`) would
    otherwise leave its workers training as orphans, holding the GPUs and the run folder. With
    the signal they save at the next step boundary and exit, as on a preemption."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)):
        self.received, self.code = None, None  # the signal this rank got; the exit code the ranks agreed on
        self.previous = {s: signal.signal(s, self._handle) for s in signals}
        self.parent = None
        if "TORCHELASTIC_RUN_ID" in os.environ and _signal_on_parent_death(signal.SIGTERM):
            self.parent = os.getppid()
            if self.parent == 1:  # torchrun died before the request was made: no signal will come
                self.received = "SIGTERM"

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == "SIGINT":
            if rank() == 0:
                os.write(2, b"SIGINT again: exiting now without saving (the checkpoints saved before are intact)\n")
            os._exit(EXIT_INTERRUPTED)
        self.received = signal.Signals(signum).name

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}
        if self.parent is not None:
            _signal_on_parent_death(0)

    def agreed(self, step: int, every: int = 10) -> bool:
        """True on every rank once any rank got a signal: all stop at the same step. Ranks compare
        notes every `every` steps, with a CPU tensor (gloo, also on GPU nodes), so the GPU's
        queue of work is never drained for it."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            self.code = exit_code(self.received) if self.received else None
            return self.code is not None
        if step % every:
            return False
        # Each rank offers the exit code its signal asks for (0: none); Ctrl-C's 130 wins over 75.
        flag = torch.tensor([exit_code(self.received) if self.received else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.code = int(flag.item()) or None
        return self.code is not None

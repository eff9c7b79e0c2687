"""Checkpoints: torch.distributed.checkpoint folders <run_dir>/checkpoints/step_<N>/.

What one holds: the model and optimizer (sharded as trained; DCP reshards them on load into any
other layout), the data loader's global position, the step and tokens seen, each rank's RNG
state (rng_rank<r>.pt), the resolved config, the tokenizer and checksums.json (size and CRC-32
of every other file, the run's id and world size).

Atomicity: every rank writes into step_<N>.tmp; rank 0 renames it to step_<N> only once DCP's
metadata is written (DCP writes it after every rank has finished its part) and the checksums
are recorded. A folder named step_<N> is therefore always whole when committed; resume checks
that it still is (every file present, of its recorded size and checksum) before trusting it.
An incomplete (.tmp) or damaged checkpoint is reported and skipped, never loaded and never
deleted; clean-up counts and deletes only checkpoints of this run whose checksums it has
verified, and never the one just written. Only a new save at the same step moves a damaged
step_<N> out of its way, to step_<N>.damaged.

Async saving (checkpoint.async_save): the state is copied to host memory (the same memory every
save, see Stager), then written by a background thread while training goes on; rank 0 computes
the checksums, commits and cleans up in a background thread of its own, off the training loop.
At most one save is in flight; the next save (or the end of training) waits for it.
"""

import datetime
import json
import mmap
import os
import re
import secrets
import shutil
import sys
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import BlockingAsyncStager
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from scaling.config import Config, ConfigError, save_config, to_dict
from scaling.distributed import is_comm_failure

STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "checksums.json"


# DCP warns on every single-process save and load (also from its background writer thread)
# that no process group exists: that is intended here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


class CheckpointError(RuntimeError):
    pass


class NoCheckpointLeft(CheckpointError):
    """A run folder holds checkpoints and none of them is whole: the run stops rather than start
    over from step 0 (under a scheduler's requeue that would throw its progress away unasked)."""

    def __init__(self, run_dir: Path):
        super().__init__(f"checkpoint: none of the checkpoints in {Path(run_dir) / 'checkpoints'} is whole (the lines "
                         "above say why); nothing was loaded or deleted. To start over, move them away "
                         "or use another logging.run_dir")


# DCP reports a failed write as a CheckpointException, which is a BaseException.
SAVE_ERRORS = (Exception, CheckpointException)


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def checkpoints(run_dir: str | Path) -> list[Path]:
    """Committed checkpoint folders of a run (not yet validated), oldest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted((p for p in root.glob("step_*") if STEP_DIR.match(p.name) and p.is_dir()), key=step_of)


def new_run_id() -> str:
    return secrets.token_hex(8)


CHUNK = 64 << 20  # checksums are per 64 MiB piece of a file, so that all cores hash one big file


def _piece_crc(path: Path, offset: int, size: int) -> int:
    """CRC-32 of bytes [offset, offset + size) of a file, read through mmap: straight from the
    page cache, 3x faster here than read() into a new buffer."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return zlib.crc32(b"")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm, memoryview(mm) as view, \
                view[offset:offset + size] as piece:
            return zlib.crc32(piece)


def crcs(folder: Path, sizes: dict[str, int]) -> dict[str, list[int]]:
    """CRC-32 of every CHUNK-sized piece of each file. CRC-32 runs at 3.8 GB/s on one core here
    (SHA-256: 1.7), and zlib releases the GIL, so threads hash pieces on every core."""
    pieces = [(n, off) for n, size in sizes.items() for off in range(0, max(size, 1), CHUNK)]
    with ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool:
        values = pool.map(lambda p: _piece_crc(folder / p[0], p[1], CHUNK), pieces)
        out = {n: [] for n in sizes}
        for (n, _), v in zip(pieces, values):
            out[n].append(v)
    return out


def write_manifest(folder: Path, run_id: str, world_size: int):
    """Record size and piece checksums of every file in a finished checkpoint folder."""
    sizes = {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file() and f.name != MANIFEST}
    sums = crcs(folder, sizes)
    files = {n: {"size": sizes[n], "crc32": sums[n]} for n in sizes}
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"run": run_id, "world_size": world_size, "chunk": CHUNK, "files": files}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)


def read_manifest(path: Path) -> dict | None:
    try:
        m = json.loads((path / MANIFEST).read_text())
        return m if isinstance(m, dict) and isinstance(m.get("files"), dict) else None
    except (OSError, ValueError):
        return None


def problem(path: Path, verify: bool = False) -> str | None:
    """Why a checkpoint folder cannot be loaded, or None if it is whole. Sizes are always
    checked; verify=True also recomputes every file's checksum (reads the whole checkpoint)."""
    if not (path / ".metadata").is_file():
        return "no .metadata"
    if not (path / "config.yaml").is_file():
        return "no config.yaml"
    if not (path / MANIFEST).is_file():
        return f"no {MANIFEST} (an older or damaged checkpoint: its files cannot be verified)"
    manifest = read_manifest(path)
    if manifest is None:
        return f"unreadable {MANIFEST}"
    try:
        meta = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # a truncated or foreign .metadata
        return f"unreadable .metadata ({type(e).__name__})"
    need = {}
    for info in meta.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    files = manifest["files"]
    for name in need.keys() - files.keys():
        return f"{name} has no recorded checksum"
    for name, rec in files.items():
        f = path / name
        if not f.is_file():
            return f"missing {name}"
        if f.stat().st_size != rec["size"]:
            return f"{name} is truncated ({f.stat().st_size} of {rec['size']} bytes)"
    if verify:
        if manifest.get("chunk") != CHUNK:
            return f"{MANIFEST} uses another piece size"
        for name, sums in crcs(path, {n: r["size"] for n, r in files.items()}).items():
            if sums != files[name]["crc32"]:
                return f"checksum mismatch in {name} (the file changed after it was saved)"
    return None


def newest_complete(run_dir: str | Path, report=print, verify: bool = True, below: int | None = None) -> Path | None:
    """The newest whole checkpoint of a run (older than step `below` if given); the others found
    on the way are reported."""
    root = Path(run_dir) / "checkpoints"
    if below is None:
        for tmp in sorted(root.glob("step_*.tmp")):
            report(f"checkpoint: ignoring {tmp} (an interrupted save; left in place)")
    for path in reversed(checkpoints(run_dir)):
        if below is not None and step_of(path) >= below:
            continue
        why = problem(path, verify)
        if why is None:
            return path
        report(f"checkpoint: skipping {path}: {why} (left in place)")
    return None


def resolve_resume(cfg: Config, report=print) -> Path | None:
    """The checkpoint to resume from according to checkpoint.resume. In a run folder (auto, or a
    folder given) it is the newest whole one by size; its checksums are verified by confirm(),
    in the background while the model is built. A checkpoint named explicitly is verified here."""
    r = cfg.checkpoint.resume
    if r == "none":
        return None
    if r == "auto":
        found = newest_complete(cfg.logging.run_dir, report, verify=False)
        if found is None and checkpoints(cfg.logging.run_dir):
            raise NoCheckpointLeft(cfg.logging.run_dir)
        return found
    path = Path(r)
    if not (path / ".metadata").exists() and (path / "checkpoints").is_dir():
        found = newest_complete(path, report, verify=False)  # a run folder: its newest checkpoint
        if found is None:
            raise ConfigError(f"checkpoint.resume: no complete checkpoint in {r}")
        return found
    why = problem(path, verify=cfg.checkpoint.verify) if path.is_dir() else "not found"
    if why:
        raise ConfigError(f"checkpoint.resume: {r} is not a usable checkpoint: {why}")
    return path


class Verification:
    """Rank 0 verifies the chosen checkpoint's checksums in a background thread (reading the
    whole checkpoint) while every rank builds the model; confirm() waits for the verdict and,
    if the checkpoint is damaged, falls back to the next older whole one of the same run."""

    def __init__(self, path: Path | None, enabled: bool):
        self.path = path
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-verify")
        self.future = self.pool.submit(problem, path, True) if path and enabled else None

    def confirm(self, check, report=print) -> Path | None:
        """The verified checkpoint to load. check(path) raises if a fallback does not fit the
        current run; NoCheckpointLeft if none verifies."""
        path, future = self.path, self.future
        while path and future:
            why = future.result()
            if why is None:
                break
            report(f"checkpoint: skipping {path}: {why} (left in place)")
            path = newest_complete(path.parent.parent, report, verify=True, below=step_of(path))
            future = None
            if path:
                check(path)
        self.pool.shutdown()
        if path is None and self.path is not None:
            raise NoCheckpointLeft(self.path.parent.parent)
        return path


def _warn(line: str):
    print(f"warning: {line}", file=sys.stderr, flush=True)


def resolve_checkpoint(path: str | Path, report=_warn) -> Path:
    """A checkpoint folder (refused if damaged: it was named), or a run folder: its newest
    checkpoint whose checksums verify. Each newer damaged one is reported, one line each, on
    stderr by default (stdout is the commands' output: samples, eval's JSON)."""
    p = Path(path)
    if (p / ".metadata").is_file():
        why = problem(p, verify=True)
        if why:
            raise FileNotFoundError(f"{p} is not a usable checkpoint: {why}")
        return p
    skipped = []
    for ckpt in reversed(checkpoints(p)):
        why = problem(ckpt, verify=True)
        if why is None:
            for line in skipped:
                report(f"checkpoint: skipping {line} (left in place); using {ckpt}")
            return ckpt
        skipped.append(f"{ckpt}: {why}")
    raise FileNotFoundError(f"no complete checkpoint in {path}" + (f" ({'; '.join(skipped)})" if skipped else ""))


# What a resumed run may not change: the shapes and meaning of the saved tensors. Anything else
# (learning rate, steps, dataset, layout, world size, ...) is reported, not refused.
FIXED = ("model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "model.vocab_size", "model.bias",
         "train.seq_len")
NOT_REPORTED = ("name", "logging.run_dir", "checkpoint.resume", "model.init_from", "model.size")


def _flat(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _spans(ids: list[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    out = []
    for i in ids:
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def tokenizer_change(saved: dict, now: dict) -> str | None:
    """What makes the same token ids mean other text, or None. A character tokenizer is its
    alphabet: re-preparing from another text can keep the name and the size and still move ids."""
    if saved.get("name") != now.get("name"):
        return f"tokenizer: {saved.get('name')!r} -> {now.get('name')!r}"
    old, new = saved.get("chars"), now.get("chars")
    if old != new:
        if old is None or new is None:
            return "tokenizer: the character alphabet is recorded on one side only"
        moved = [i for i in range(max(len(old), len(new))) if old[i:i + 1] != new[i:i + 1]]
        which = f"ids {_spans(moved)} now stand" if len(moved) > 1 else f"id {moved[0]} now stands"
        return f"tokenizer: the character alphabet changed ({which} for other characters)"
    for key in ("vocab_size", "eot"):
        if saved.get(key) != now.get(key):
            return f"tokenizer: {key} {saved.get(key)!r} -> {now.get(key)!r}"
    return None


def compare_configs(path: Path, cfg: Config, tokenizer: dict) -> tuple[list[str], list[str]]:
    """(refused, changed): one line per key that differs between checkpoint `path` and the
    current config (and tokenizer spec: name, vocab_size, eot, a character alphabet); refused
    lines name keys in FIXED or a changed tokenizer."""
    saved = _flat(yaml.safe_load((path / "config.yaml").read_text()) or {})
    tok = json.loads((path / "tokenizer.json").read_text())
    if saved.get("model.vocab_size") is None:  # left to the dataset when it was saved
        saved["model.vocab_size"] = tok["vocab_size"]
    now = _flat(to_dict(cfg))
    refused, changed = [], []
    for key in sorted(saved.keys() | now.keys()):
        old, new = saved.get(key), now.get(key)
        if old == new or key in NOT_REPORTED:
            continue
        line = f"{key}: {old!r} -> {new!r}"
        (refused if key in FIXED else changed).append(line)
    if why := tokenizer_change(tok, tokenizer):
        refused.append(why)
    return refused, changed


def world_size_change(path: Path, cfg: Config) -> dict | None:
    """How the ranks and the split of the global batch differ from checkpoint `path`'s, or None
    when the world size is the same (a run that lost a node, or gained some, resumes this way)."""
    saved = _flat(yaml.safe_load((path / "config.yaml").read_text()) or {})
    keys = ("parallel.dp_replicate", "parallel.dp_shard", "parallel.tp", "train.micro_batch_size", "train.global_batch_size")
    if not all(isinstance(saved.get(k), int) for k in keys):  # a config.yaml edited by hand: compare_configs says what
        return None
    dp_was = saved["parallel.dp_replicate"] * saved["parallel.dp_shard"]
    p, t = cfg.parallel, cfg.train
    dp = p.dp_replicate * p.dp_shard
    if dp_was * saved["parallel.tp"] == dp * p.tp:
        return None
    return {"world_size_from": dp_was * saved["parallel.tp"], "world_size": dp * p.tp, "dp_from": dp_was, "dp": dp,
            "accumulation_from": saved["train.global_batch_size"] // (saved["train.micro_batch_size"] * dp_was),
            "accumulation": t.global_batch_size // (t.micro_batch_size * dp),
            "micro_batch_size_from": saved["train.micro_batch_size"], "micro_batch_size": t.micro_batch_size,
            "global_batch_size_from": saved["train.global_batch_size"], "global_batch_size": t.global_batch_size}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _set_aside(path: Path, suffix: str) -> Path:
    """Rename path to <name><suffix> (or <name><suffix>.<k> if taken); returns the new path."""
    target, k = path.with_name(path.name + suffix), 1
    while target.exists():
        target, k = path.with_name(f"{path.name}{suffix}.{k}"), k + 1
    path.rename(target)
    return target


def _layout(obj, path=""):
    """The structure of a state dict: where each tensor is, its shape and dtype (values aside)."""
    if isinstance(obj, dict):
        return tuple(_layout(v, f"{path}.{k}") for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return tuple(_layout(v, f"{path}.{i}") for i, v in enumerate(obj))
    if isinstance(obj, torch.Tensor):
        local = obj.to_local() if isinstance(obj, DTensor) else obj
        return path, tuple(local.shape), local.dtype
    return path, type(obj)


class Stager(BlockingAsyncStager):
    """Stages async saves into host memory kept from one save to the next (torchtitan's way),
    instead of DCP's default of fresh memory every save: pinned on CUDA, so the copy from the
    GPU runs at full speed; plain on CPU, where pinning needs an accelerator (torch's own cached
    stager always pins). Safe to reuse: at most one save is in flight, and the next save waits
    for its write before staging over it. BlockingAsyncStager(cache_staged_state_dict=True)
    exists on torch 2.11 and 2.13; DefaultStager on 2.11 drops its cache after every save."""

    def __init__(self, pin: bool):
        super().__init__(cache_staged_state_dict=True)
        self.pin = pin
        self.reused = 0  # saves staged into the memory of an earlier one
        self.layout = None

    def stage(self, state_dict):
        layout = _layout(state_dict)
        if self.state_dict_cache is None or layout != self.layout:  # first save, or the state changed shape
            self.state_dict_cache, self.layout = _create_cpu_state_dict(state_dict, pin_memory=self.pin), layout
        else:
            self.reused += 1
        # The copy returns the cached tensors with this save's plain values (step, loader position).
        return _copy_state_dict(state_dict, self.state_dict_cache, type_check=False)

    def close(self):
        self.state_dict_cache = None


class Checkpointer:
    """Saves, commits, purges and loads the checkpoints of one run. Every rank holds one."""

    def __init__(self, cfg: Config, tokenizer: dict, run_id: str):
        self.cfg, self.tokenizer, self.run_id = cfg, tokenizer, run_id
        self.root = Path(cfg.logging.run_dir) / "checkpoints"
        self.pending = None  # the save in flight: rank 0's commit, other ranks' DCP write
        self.verified = set()  # checkpoints whose checksums this process has checked or taken
        self.damaged = set()  # checkpoints the clean-up found damaged (and left in place)
        self.group = None
        if cfg.checkpoint.async_save and dist.is_initialized():
            # The background writer's collectives get their own gloo group, so they never
            # interleave with training's; with the run's timeout, not torch's 30 minutes, so a
            # dead rank cannot keep the others waiting on a save at exit.
            self.group = dist.new_group(backend="gloo",
                                        timeout=datetime.timedelta(seconds=cfg.parallel.timeout_s))
        self.stager = Stager(pin=torch.cuda.is_available()) if cfg.checkpoint.async_save else None
        self.committer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-commit") if _rank() == 0 else None
        self.purging = None  # rank 0's deletion of old checkpoints, in the background

    def save(self, step: int, state: dict):
        """Write checkpoint step_<step> of state (a dict of state dicts) on every rank."""
        self.wait()  # at most one save in flight
        start = time.perf_counter()
        final = self.root / f"step_{step}"
        tmp = final.with_name(final.name + ".tmp")
        try:
            if _rank() == 0:
                if tmp.exists():  # left by a save that was killed; it was never a checkpoint
                    print(f"checkpoint: replacing the interrupted save {tmp}", flush=True)
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            _barrier()
            torch.save(rng_state(), tmp / f"rng_rank{_rank()}.pt")
            if self.cfg.checkpoint.async_save:
                future = dcp.async_save(state, checkpoint_id=tmp, process_group=self.group,
                                        async_stager=self.stager)
                blocked = time.perf_counter() - start  # staging: training goes on while the write runs
                self.pending = (self.committer.submit(self._commit_after, future, tmp, final, blocked)
                                if self.committer else future), tmp, final
                return
            dcp.save(state, checkpoint_id=tmp)
        except SAVE_ERRORS as e:
            self._failed(tmp, final, e)
        _barrier()
        if _rank() == 0:
            self._commit(tmp, final, time.perf_counter() - start)
        _barrier()

    def poll(self):
        """Surface the end of the save in flight if it has finished; cheap, call every step."""
        if self.pending and self.pending[0].done():
            self._finish()
        if self.purging and self.purging.done():
            self._purged()

    def _purged(self):
        """A deletion that failed costs disk space, not the run: said, not raised."""
        e, self.purging = self.purging.exception(), None
        if e is not None:
            print(f"checkpoint: deleting old checkpoints failed: {e}", flush=True)

    def wait(self):
        """Block until the save in flight is written and committed. Every rank calls this at the
        same points, so the barrier is always matched, whether or not a rank still had its save
        pending (poll() may already have collected it)."""
        if self.pending:
            self._finish()
        _barrier()

    def _finish(self):
        future, tmp, final = self.pending
        self.pending = None
        try:
            future.result()  # re-raise a failed write here rather than lose it
        except SAVE_ERRORS as e:
            self._failed(tmp, final, e)

    def _failed(self, tmp: Path, final: Path, e: Exception):
        """A save that failed (disk full, I/O error): its partial folder is never a checkpoint;
        rank 0 removes it to give back the space. Older checkpoints are untouched."""
        if is_comm_failure(e):  # another rank died: not this save's fault
            raise e
        # torch.save reports a full disk as "unexpected pos" and DCP wraps errors: ask the disk.
        full = "No space left" in str(e) or shutil.disk_usage(self.root).free < (1 << 20)
        why = "no space left on device" if full else str(e).strip().splitlines()[0][:300]
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"saving {final} failed: {why}; the checkpoints saved before are intact") from e

    def _commit_after(self, future, tmp: Path, final: Path, blocked: float):
        # DCP's rank-0 future finishes only after every rank's write results are collected and
        # the metadata is written, so rank 0 alone may commit.
        future.result()
        self._commit(tmp, final, blocked)

    def _commit(self, tmp: Path, final: Path, blocked: float):
        """Rank 0: config, tokenizer and checksums into tmp, then the atomic rename, then one line
        (step, size, how long training waited for it, where), then clean-up."""
        save_config(self.cfg, tmp / "config.yaml")
        (tmp / "tokenizer.json").write_text(json.dumps(self.tokenizer))
        write_manifest(tmp, self.run_id, _world())
        old = None
        if final.exists():  # the same step saved before: a re-done step, or a damaged folder
            if problem(final, verify=True) is not None:
                kept = _set_aside(final, ".damaged")
                print(f"checkpoint: {final} was damaged; kept as {kept}", flush=True)
            else:
                old = _set_aside(final, ".deleting")
        tmp.rename(final)
        _fsync_dir(final.parent)
        if old:
            shutil.rmtree(old)
        size = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
        print(f"checkpoint: step {step_of(final)} saved, {size / 1e6:,.1f} MB, training blocked {blocked:.2f}s: {final}",
              flush=True)
        self.verified.add(final)  # its checksums were just taken from the files themselves
        # Deleting old checkpoints (minutes for XL on a network filesystem) happens on rank 0's
        # commit thread, never while the other ranks wait at the save's closing barrier.
        self.purging = self.committer.submit(self._purge, final)

    def _purge(self, just_saved: Path):
        """Keep the newest checkpoint.keep checkpoints of this run, every keep_every-th for good,
        and always the one just saved; delete the rest. Only a folder whose checksums this process
        has verified is counted or deleted: other runs' checkpoints (and folders whose
        checksums.json cannot say whose they are) are left as they are, and a damaged one of this
        run is reported and left in place, as resume leaves it, never counted nor deleted. A
        folder is renamed before it is deleted, so a deletion cut short never leaves a step_<N>
        that looks like a checkpoint.

        Verifying reads a whole checkpoint. That is affordable: this runs on rank 0's commit
        thread, off the training loop (the next save waits for it only if it is not done by
        then), and reads each checkpoint at most once per process. Those this process wrote or
        resumed from are in self.verified already, so only the checkpoints of earlier processes
        are read, once, before they are counted or deleted; those kept for good are neither, so
        they are never read here."""
        keep, every = self.cfg.checkpoint.keep, self.cfg.checkpoint.keep_every
        if keep <= 0:
            return
        kept = 0
        for path in reversed(checkpoints(self.root.parent)):
            if (read_manifest(path) or {}).get("run") != self.run_id:
                continue
            counted = kept < keep
            if not counted and (path == just_saved or (every and step_of(path) % every == 0)):
                continue  # kept, and not counted: no need to read it
            if path not in self.verified:  # a checkpoint this process did not write nor resume from
                if path in self.damaged:
                    continue
                if why := problem(path, verify=True):
                    self.damaged.add(path)  # said once; a save at this step sets it aside (_commit)
                    print(f"checkpoint: {path} is damaged ({why}); left in place, not counted nor deleted",
                          flush=True)
                    continue
                self.verified.add(path)
            if counted:
                kept += 1
            else:
                shutil.rmtree(_set_aside(path, ".deleting"))
        for left in self.root.glob("step_*.deleting*"):  # a deletion cut short by a kill
            shutil.rmtree(left, ignore_errors=True)

    def load(self, path: Path, state: dict) -> bool:
        """Fill state (same structure as saved) from a checkpoint, resharding as needed. Returns
        whether the RNG states were restored (only with the world size they were saved at)."""
        saved = {k for k in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata if k.startswith("model.")}
        wanted = {f"model.{k}" for k in state["model"]}
        if saved != wanted:  # DCP would load the common part and silently drop the rest
            extra, missing = sorted(saved - wanted), sorted(wanted - saved)
            raise ConfigError(f"checkpoint.resume: {path} does not fit this model: "
                              f"{len(extra)} tensors only in the checkpoint {extra[:3]}, "
                              f"{len(missing)} only in the model {missing[:3]}")
        dcp.load(state, checkpoint_id=path)
        if self.cfg.checkpoint.verify:  # resume verified it (rank 0, before choosing it)
            self.verified.add(path)
        manifest = read_manifest(path) or {}
        if manifest.get("world_size", 0) != _world():
            return False  # another world size: dropout streams restart from the seed
        s = torch.load(path / f"rng_rank{_rank()}.pt", weights_only=True)
        torch.set_rng_state(s["cpu"])
        if "cuda" in s and torch.cuda.is_available():
            torch.cuda.set_rng_state(s["cuda"])
        return True

    def close(self):
        if self.committer:
            self.committer.shutdown(wait=True)
        if self.purging:
            self._purged()
        if self.stager:
            self.stager.close()  # the staging copy: a whole model and optimizer of host memory


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def train_state(model, optimizer, loader, guard, step: int, tokens: int) -> dict:
    """Everything a checkpoint holds besides RNG states, config and tokenizer (added by save)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd, "data": loader.state_dict(),
            "train": {"step": step, "tokens": tokens, **guard.state_dict()}}


def resume_from(ckpt: "Checkpointer", path: Path, model, optimizer, loader, guard, log) -> tuple[int, int]:
    """Load a checkpoint into the run's model, optimizer, loader and spike guard; (step, tokens)."""
    state = train_state(model, optimizer, loader, guard, 0, 0)
    same_rng = ckpt.load(path, state)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    loader.load_state_dict(state["data"])
    guard.load_state_dict(state["train"])
    step, tokens = int(state["train"]["step"]), int(state["train"]["tokens"])
    log(f"resumed from {path} at step {step}" + ("" if same_rng else
        " (another world size: dropout RNG streams restart from the seed)"), flush=True)
    return step, tokens

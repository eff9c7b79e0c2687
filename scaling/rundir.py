"""The run folder: what a run checks and claims before it writes anything there.

Rank 0 alone decides (open_run), in this order, and nothing is written into the folder until
every check has passed: the folder is a folder; the checkpoint to resume from (the newest whole
one; its checksums are verified in the background, see checkpoint.Verification) fits the current
model; a fresh run does not land on top of another run's work;
no other live run holds the folder (a POSIX lock, released by the kernel when its holder dies,
also over NFS). Then config.yaml is written.
"""

import dataclasses
import fcntl
import os
import socket
from pathlib import Path

import yaml

from scaling import checkpoint
from scaling.config import Config, ConfigError, OptimConfig, save_config
from scaling.optim import lr_at

LOCK = ".lock"
_held = {}  # run folder -> its open lock file: closing it releases the lock


def holds_run(run_dir: Path) -> list[str]:
    """What in run_dir shows that a run has already used it (empty if nothing)."""
    found = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        found.append("metrics.jsonl")
    return found


def claim(run_dir: Path):
    """Hold run_dir for this process until it exits; refuse if a live run holds it."""
    key = run_dir.resolve()
    if key in _held:  # this process ran in the folder before (train() called again in-process)
        _held.pop(key).close()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        f = open(run_dir / LOCK, "a+")
    except OSError as e:
        raise ConfigError(f"logging.run_dir: cannot write to {run_dir}: {e.strerror.lower()}") from None
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(f"logging.run_dir: {run_dir} is in use by a running run ({holder}); wait for it "
                          "to end or use another logging.run_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"host {socket.gethostname()}, pid {os.getpid()}")
    f.flush()
    _held[key] = f


class RunFinished(Exception):
    """The checkpoint to resume from is at or past train.max_steps: nothing to train. Every rank
    exits with code 0 (distributed.on_rank0 passes exit_code on)."""
    exit_code = 0


def check_unfinished(resume: Path, cfg: Config):
    """Refuse, with exit 0, to resume a run that has nothing left to train, before anything is
    built or written (config.yaml in the folder stays the finished run's)."""
    step, max_steps = checkpoint.step_of(resume), cfg.train.max_steps
    if step < max_steps:
        return
    # Resume verifies in the background and falls back to an older checkpoint if this one is
    # damaged; here that is checked first (this once), as the older one may have steps to train.
    if cfg.checkpoint.verify and checkpoint.problem(resume, verify=True):
        return
    where = "at" if step == max_steps else "past"
    run_dir = Path(cfg.logging.run_dir)
    n = len(checkpoint.checkpoints(run_dir))
    own = resume.parent.parent.resolve() == run_dir.resolve()
    held = (f"{n} checkpoint{'s' if n > 1 else ''} up to {resume.name}" if own
            else f"no checkpoint of its own; checkpoint.resume names {resume}")
    raise RunFinished(f"{cfg.logging.run_dir}: finished, nothing to train: it holds {held}; {resume.name} is {where} "
                      f"train.max_steps={max_steps}. To train it longer, raise "
                      f"--train.max_steps; to start a new run, give another --logging.run_dir (or move "
                      f"{cfg.logging.run_dir} away)")


def schedule_change(path: Path, cfg: Config) -> str | None:
    """What a changed train.max_steps (or schedule key) does to the learning rate of the next
    step, said in one line: by default the cosine decay ends at max_steps, so extending a run
    moves the decay and raises the learning rate again."""
    saved = yaml.safe_load((path / "config.yaml").read_text()) or {}
    old_max = (saved.get("train") or {}).get("max_steps")
    fields = {f.name for f in dataclasses.fields(OptimConfig)}
    old = OptimConfig(**{k: v for k, v in (saved.get("optim") or {}).items() if k in fields})
    if old_max is None or (old_max, old) == (cfg.train.max_steps, cfg.optim):
        return None
    step = checkpoint.step_of(path)
    was, now = lr_at(step, old, old_max), lr_at(step, cfg.optim, cfg.train.max_steps)
    if was == now:
        return f"the learning rate schedule goes on as before (lr {now:.2e} at step {step + 1})"
    keep = ""
    if cfg.optim.decay_steps is None and old.decay_steps is None and old.warmup_steps == cfg.optim.warmup_steps:
        keep = (f"; to keep the schedule it was on, add --optim.decay_steps={old_max - old.warmup_steps} "
                "(the added steps then train at optim.min_lr)")
    return f"the learning rate at step {step + 1} is {now:.2e}, where the schedule it was saved with had {was:.2e}{keep}"


# Said once, in the world size's line, when the world size changed.
LAYOUT_KEYS = ("parallel.dp_replicate:", "parallel.dp_shard:", "parallel.tp:", "train.micro_batch_size:")


def check_fits(path: Path, cfg: Config, tokenizer: dict, report=print):
    """Refuse a checkpoint of another model shape; report every other change, one line each,
    and what a changed schedule does to the learning rate."""
    refused, changed = checkpoint.compare_configs(path, cfg, tokenizer)
    if refused:
        raise ConfigError(f"checkpoint.resume: {path} was trained with another model or data shape: "
                          f"{'; '.join(refused)} (change them back, or use another logging.run_dir)")
    if c := checkpoint.world_size_change(path, cfg):  # one line for the layout and the batch split
        changed = [line for line in changed if not line.startswith(LAYOUT_KEYS)]
        micro = c["micro_batch_size"] if c["micro_batch_size"] == c["micro_batch_size_from"] else \
            f"{c['micro_batch_size_from']} -> {c['micro_batch_size']}"
        kept = " kept" if c["global_batch_size"] == c["global_batch_size_from"] else ""
        report(f"resume: world size {c['world_size_from']} -> {c['world_size']} ranks (data-parallel {c['dp_from']} -> "
               f"{c['dp']}): {c['accumulation_from']} -> {c['accumulation']} micro batches of {micro} sequences per "
               f"rank and step, global batch of {c['global_batch_size']} sequences{kept}")
    for line in changed:
        report(f"resume: {line}")
    if changed and (line := schedule_change(path, cfg)):
        report(f"resume: {line}")


def open_run(cfg: Config, tokenizer: dict, report=print) -> tuple[Path | None, str | None]:
    """(checkpoint to resume from or None, the run id it carries or None for a new run)."""
    run_dir = Path(cfg.logging.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"logging.run_dir: {run_dir} is a file, not a folder")
    resume = checkpoint.resolve_resume(cfg, report=report)
    run_id = None
    if resume:
        check_unfinished(resume, cfg)
        check_fits(resume, cfg, tokenizer, report)
        run_id = (checkpoint.read_manifest(resume) or {}).get("run")
    elif cfg.checkpoint.resume == "none" and (found := holds_run(run_dir)):
        raise ConfigError(f"logging.run_dir: {run_dir} already holds a run ({', '.join(found[:4])}); use "
                          "another logging.run_dir, or resume it with checkpoint.resume=auto")
    claim(run_dir)
    try:
        save_config(cfg, run_dir / "config.yaml")
    except OSError as e:
        raise ConfigError(f"logging.run_dir: cannot write to {run_dir}: {e.strerror.lower()}") from None
    return resume, run_id

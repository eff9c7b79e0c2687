"""The run folder: what a run checks and claims before it writes anything there.

Rank 0 alone decides (open_run), in this order, and nothing is written into the folder until
every check has passed: the folder is a folder; the checkpoint to resume from (the newest whole
one; its checksums are verified in the background, see checkpoint.Verification) fits the current
model; a fresh run does not land on top of another run's work;
no other live run holds the folder (a POSIX lock, released by the kernel when its holder dies,
also over NFS). Then config.yaml is written.
"""

import fcntl
import os
import socket
from pathlib import Path

from scaling import checkpoint
from scaling.config import Config, ConfigError, save_config

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


def check_fits(path: Path, cfg: Config, tokenizer: dict, report=print):
    """Refuse a checkpoint of another model shape; report every other change, one line each."""
    refused, changed = checkpoint.compare_configs(path, cfg, tokenizer)
    if refused:
        raise ConfigError(f"checkpoint.resume: {path} was trained with another model or data shape: "
                          f"{'; '.join(refused)} (change them back, or use another logging.run_dir)")
    for line in changed:
        report(f"resume: {line}")


def open_run(cfg: Config, tokenizer: dict, report=print) -> tuple[Path | None, str | None]:
    """(checkpoint to resume from or None, the run id it carries or None for a new run)."""
    run_dir = Path(cfg.logging.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"logging.run_dir: {run_dir} is a file, not a folder")
    resume = checkpoint.resolve_resume(cfg, report=report)
    run_id = None
    if resume:
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

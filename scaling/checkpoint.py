"""Checkpoints: torch.distributed.checkpoint folders <run_dir>/checkpoints/step_<N>/.

What one holds: the model and optimizer (sharded as trained; DCP reshards them on load into any
other layout), the data loader's global position, the step and tokens seen, each rank's RNG
state (rng_rank<r>.pt), the resolved config and the tokenizer. The learning rate is a function
of the step, so the step restores the schedule.

Atomicity: every rank writes into step_<N>.tmp; the folder is renamed to step_<N> by rank 0
only once DCP's metadata is written, which DCP does only after every rank has finished its
part. A folder named step_<N> is therefore always whole. Resume checks that every file the
metadata names is present and long enough before it trusts a checkpoint; an incomplete (.tmp)
or damaged one is reported and skipped, never loaded and never deleted.

Async saving (checkpoint.async_save): the state is copied to host memory, then written by a
background thread while training goes on; at most one save is in flight, and the next save (or
the end of training) waits for it.
"""

import json
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from scaling.config import Config, ConfigError, load_config, save_config

STEP_DIR = re.compile(r"^step_(\d+)$")


# DCP warns on every single-process save and load (also from its background writer thread)
# that no process group exists: that is intended here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def checkpoints(run_dir: str | Path) -> list[Path]:
    """Committed checkpoint folders of a run (not yet validated), oldest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted((p for p in root.glob("step_*") if STEP_DIR.match(p.name) and p.is_dir()), key=step_of)


def problem(path: Path) -> str | None:
    """Why a checkpoint folder cannot be loaded, or None if it is whole."""
    if not (path / ".metadata").is_file():
        return "no .metadata"
    if not (path / "config.yaml").is_file():
        return "no config.yaml"
    try:
        meta = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # a truncated or foreign .metadata
        return f"unreadable .metadata ({type(e).__name__})"
    need = {}
    for info in meta.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in need.items():
        f = path / name
        if not f.is_file():
            return f"missing {name}"
        if f.stat().st_size < size:
            return f"{name} is truncated ({f.stat().st_size} of {size} bytes)"
    return None


def newest_complete(run_dir: str | Path, report=print) -> Path | None:
    """The newest whole checkpoint of a run; the others found on the way are reported."""
    root = Path(run_dir) / "checkpoints"
    for tmp in sorted(root.glob("step_*.tmp")):
        report(f"checkpoint: ignoring {tmp} (an interrupted save; left in place)")
    for path in reversed(checkpoints(run_dir)):
        why = problem(path)
        if why is None:
            return path
        report(f"checkpoint: skipping {path}: {why} (left in place)")
    return None


def resolve_resume(cfg: Config, report=print) -> Path | None:
    """The checkpoint to resume from according to checkpoint.resume."""
    r = cfg.checkpoint.resume
    if r == "none":
        return None
    if r == "auto":
        return newest_complete(cfg.logging.run_dir, report)
    path = Path(r)
    if not (path / ".metadata").exists() and (path / "checkpoints").is_dir():
        found = newest_complete(path, report)  # a run folder: its newest checkpoint
        if found is None:
            raise ConfigError(f"checkpoint.resume: no complete checkpoint in {r}")
        return found
    why = problem(path) if path.is_dir() else "not found"
    if why:
        raise ConfigError(f"checkpoint.resume: {r} is not a usable checkpoint: {why}")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (meaning its newest complete checkpoint)."""
    p = Path(path)
    if (p / ".metadata").is_file():
        why = problem(p)
        if why:
            raise FileNotFoundError(f"{p} is not a usable checkpoint: {why}")
        return p
    found = newest_complete(p, report=lambda *_: None)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint in {path}")
    return found


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


class Checkpointer:
    """Saves, commits, purges and loads the checkpoints of one run. Every rank holds one."""

    def __init__(self, cfg: Config, tokenizer: dict):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.root = Path(cfg.logging.run_dir) / "checkpoints"
        self.pending = None  # (future, tmp, final) of the save in flight
        self.group = None
        if cfg.checkpoint.async_save and dist.is_initialized():
            # The background writer's collectives get their own gloo group, so they never
            # interleave with training's collectives on the default group.
            self.group = dist.new_group(backend="gloo")

    def save(self, step: int, state: dict):
        """Write checkpoint step_<step> of state (a dict of state dicts) on every rank."""
        self.wait()  # at most one save in flight
        final = self.root / f"step_{step}"
        tmp = final.with_name(final.name + ".tmp")
        if _rank() == 0:
            if tmp.exists():  # left by a save that was killed; it was never a checkpoint
                print(f"checkpoint: replacing the interrupted save {tmp}", flush=True)
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        torch.save(rng_state(), tmp / f"rng_rank{_rank()}.pt")
        if self.cfg.checkpoint.async_save:
            self.pending = (dcp.async_save(state, checkpoint_id=tmp, process_group=self.group), tmp, final)
            return
        dcp.save(state, checkpoint_id=tmp)
        _barrier()
        self._commit(tmp, final)
        _barrier()

    def poll(self):
        """Commit the save in flight if it has finished; cheap, call every step."""
        if self.pending and self.pending[0].done():
            self._finish()

    def wait(self):
        """Block until the save in flight is written and committed. Every rank calls this at the
        same points, so the barrier is always matched, whether or not a rank still had its save
        pending (rank 0 may already have committed it in poll())."""
        if self.pending:
            self._finish()
        _barrier()

    def _finish(self):
        future, tmp, final = self.pending
        self.pending = None
        future.result()  # re-raise a failed write here rather than lose it
        # Rank 0's save finishes only after DCP has collected every rank's write results and
        # written the metadata, so rank 0 alone may commit.
        self._commit(tmp, final)

    def _commit(self, tmp: Path, final: Path):
        if _rank() != 0:
            return
        save_config(self.cfg, tmp / "config.yaml")
        (tmp / "tokenizer.json").write_text(json.dumps(self.tokenizer))
        if final.exists():  # a fresh run (resume=none) saving a step an older run saved too
            old = final.with_name(final.name + ".old")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        self._purge()

    def _purge(self):
        """Keep the newest checkpoint.keep checkpoints, and every keep_every-th for good."""
        keep, every = self.cfg.checkpoint.keep, self.cfg.checkpoint.keep_every
        if keep <= 0:
            return
        for path in checkpoints(self.root.parent)[:-keep]:
            if not (every and step_of(path) % every == 0):
                shutil.rmtree(path)

    def load(self, path: Path, state: dict):
        """Fill state (same structure as saved) from a checkpoint, resharding as needed."""
        dcp.load(state, checkpoint_id=path)
        rng = path / f"rng_rank{_rank()}.pt"
        same_world = (dist.get_world_size() if dist.is_initialized() else 1) == len(list(path.glob("rng_rank*.pt")))
        if same_world and rng.is_file():
            s = torch.load(rng, weights_only=True)
            torch.set_rng_state(s["cpu"])
            if "cuda" in s and torch.cuda.is_available():
                torch.cuda.set_rng_state(s["cuda"])
            return True
        return False  # another world size: dropout streams restart from the seed


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def load_model(path: str | Path, device="cpu"):
    """(model, tokenizer, config) from a checkpoint or run folder, for inference."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from scaling.model import GPT
    from scaling.tokenizer import get_tokenizer
    from scaling.train import model_config

    ckpt = resolve_checkpoint(path)
    # The saved layout was for the training world; inference here is one process.
    cfg = load_config(str(ckpt / "config.yaml"), ["--parallel.dp_replicate=1", "--parallel.dp_shard=1",
                                                  "--parallel.tp=1"])
    tok_spec = json.loads((ckpt / "tokenizer.json").read_text())
    with torch.device("meta"):
        model = GPT(model_config(cfg, tok_spec["vocab_size"]))
    model.to_empty(device=device)
    model.tie_weights()
    sd = get_model_state_dict(model)
    dcp.load({"model": sd}, checkpoint_id=ckpt)
    model.eval()
    return model, get_tokenizer(tok_spec["name"], tok_spec), cfg

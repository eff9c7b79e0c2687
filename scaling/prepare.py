"""Dataset preparation shared by every data/<name>/prepare.py: documents -> token files.

Each dataset is a function from an input (the hub's parquet files by default, or a local file or
folder given with --input; scaling/sources.py reads them) to documents with their split; one
pipeline tokenizes them in batches on every core (a pool of worker processes for GPT-2 BPE),
appends the end-of-text token per document, and streams the ids into shards of SHARD_TOKENS
tokens, so memory stays bounded whatever the corpus size.

One preparation at a time per output: a lock file beside it (.<name>.lock) is held from before
the first byte written to the end; a second preparation into the same folder is refused.
Everything is written into a staging folder beside the output and moved in only once complete:
a bad input, an error or a kill never costs the dataset already there, and no temporary file
ever lands in the finished dataset. Each time a shard is finished, progress.json in the staging
folder records how many documents are written and how far each split's open file goes; the same
command run again continues from there (the open files cut back to that point), so an
interrupted preparation ends byte-identical to an uninterrupted one. --restart discards it.
meta.json is written last and marks a complete dataset.

The embedded corpus lives here too: the Python standard library's own source, present on every
machine that runs this code, so the demo needs no download.
"""

import argparse
import collections
import contextlib
import errno
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import sysconfig
import threading
import time
from pathlib import Path

import numpy as np

from scaling.config import Config, die
from scaling.data import DataError, TokenWriter, load_meta, read_tokens, token_dtype
from scaling.sources import (NETWORK_ERRORS, Documents, hub_parquet, is_network_error, listed, local_documents,
                             no_network, parquet_documents)
from scaling.tokenizer import ByteTokenizer, CharTokenizer, GPT2Tokenizer

SHARD_TOKENS = 100_000_000  # tokens per file before a split starts its next file
PROGRESS = "progress.json"  # in the staging folder: where an interrupted preparation continues
STRAYS = ("*.bin.tmp", "meta.json.tmp", "input.txt.tmp")  # what a crash or race in earlier versions left in a dataset
STOP_SECONDS = 10  # after an error, how long the tokenizer workers get to end on SIGTERM before SIGKILL


class SplitWriter:
    """Appends tokenized documents to <split>_<k>.bin files, starting a new file every
    shard_tokens tokens (a document may continue into the next file)."""

    def __init__(self, out_dir: Path, split: str, vocab_size: int, shard_tokens: int = SHARD_TOKENS):
        self.out_dir, self.split, self.vocab_size = out_dir, split, vocab_size
        self.shard_tokens = shard_tokens
        self.files, self.tokens, self.docs = [], 0, 0
        self.closed = 0  # files finished by this writer
        self.writer = None

    def write(self, ids):
        self.docs += 1
        while len(ids):
            if self.writer is None:
                name = f"{self.split}_{len(self.files):06d}.bin"
                self.writer = TokenWriter(self.out_dir / name, self.vocab_size)
                self.files.append(name)
            room = self.shard_tokens - self.writer.count
            self.writer.write(ids[:room])
            self.tokens += min(room, len(ids))
            ids = ids[room:]
            if self.writer.count >= self.shard_tokens:
                self.writer.close()
                self.writer = None
                self.closed += 1

    def close(self) -> dict:
        if self.writer is not None:
            self.writer.close()
        return {"files": self.files, "tokens": self.tokens, "documents": self.docs}

    def state(self) -> dict:
        """Where this split stands, its open file synced to disk first."""
        if self.writer is not None:
            self.writer.sync()
        return {"files": self.files, "tokens": self.tokens, "documents": self.docs,
                "open": None if self.writer is None else self.writer.count}

    @classmethod
    def resume(cls, out_dir: Path, split: str, vocab_size: int, shard_tokens: int, state: dict):
        w = cls(out_dir, split, vocab_size, shard_tokens)
        w.files, w.tokens, w.docs = list(state["files"]), state["tokens"], state["documents"]
        done = w.files[:-1] if state["open"] is not None else w.files
        for name in done:
            read_tokens(out_dir / name)  # present, and as long as its header says
        if state["open"] is not None:
            w.writer = TokenWriter(out_dir / w.files[-1], vocab_size, resume_count=state["open"])
        return w


def write_meta(out_dir: Path, tokenizer, splits: dict, source: str, **extra):
    """meta.json is written last: its presence marks a complete dataset."""
    meta = {"format": 1, "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
            "eot": tokenizer.eot, "source": source, "splits": splits, **extra}
    tmp = out_dir / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(out_dir / "meta.json")
    return meta


def stdlib_files() -> list[Path]:
    """The standard library's .py files, tests and bundled apps left out, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "turtledemo", "lib2to3", "__pycache__"}
    files = [p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_val(key: str, val_percent: int = 5) -> bool:
    """A stable split decision per document: the same file is in the same split everywhere."""
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 100 < val_percent


def beside(out_dir: str | Path, what: str) -> Path:
    """.<name>.<what> next to out_dir: outside the dataset, on its filesystem (moving in is a rename)."""
    out_dir = Path(out_dir).resolve()
    return out_dir.with_name(f".{out_dir.name}.{what}")


def staging_dir(out_dir: str | Path) -> Path:
    return beside(out_dir, "partial")


class Busy(DataError):
    """Another process is preparing the same output folder."""


_held = {}  # output folder -> its open lock file, while this process prepares it


@contextlib.contextmanager
def preparing(out_dir: str | Path, wait: bool = False):
    """Hold out_dir for this process's preparation; refuse (or with wait, wait) while another
    process holds it. A POSIX lock on .<name>.lock beside it: the kernel releases it when its
    holder dies, also over NFS. The file is never deleted: a process waiting on it would then hold
    a lock on a file nobody else sees. Re-entrant: main() holds it around a download, then
    write_dataset() again around the tokens."""
    key = Path(out_dir).resolve()
    if key in _held:
        yield
        return
    key.parent.mkdir(parents=True, exist_ok=True)
    f = open(beside(key, "lock"), "a+")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        if not wait:
            f.close()
            raise Busy(f"{out_dir} is being prepared by another process ({holder}); wait for it to finish, "
                       "or prepare into another folder") from None
        print(f"waiting for the preparation of {out_dir} by another process ({holder}) ...", flush=True)
        fcntl.lockf(f, fcntl.LOCK_EX)
    f.seek(0)
    f.truncate()
    f.write(f"host {socket.gethostname()}, pid {os.getpid()}")
    f.flush()
    _held[key] = f
    try:
        yield
    finally:
        del _held[key]
        f.close()  # releases the lock


def write_dataset(out_dir: str | Path, tokenizer, docs: Documents, workers: int | None = None,
                  batch_chars: int = 1 << 20, eot: bool = True, shard_tokens: int = SHARD_TOKENS,
                  restart: bool = False, **extra) -> dict:
    """Tokenize docs into token files under out_dir; returns meta.json's content.

    Documents go to the encoder in batches of about batch_chars characters; up to two batches
    per worker are in flight while the oldest finished one is written, in input order. Memory
    holds those batches, never the corpus. The files go to the staging folder and replace
    out_dir's only when complete; an interrupted run left progress there to continue from.
    """
    out_dir = Path(out_dir)
    with preparing(out_dir):  # before the first byte written: another process may be preparing it
        staging = staging_dir(out_dir)
        identity = json.loads(json.dumps({"input": docs.fingerprint, "tokenizer": tokenizer.name,
                                          "vocab_size": tokenizer.vocab_size, "eot": eot,
                                          "shard_tokens": shard_tokens, **extra}))
        start, writers = begin(staging, identity, tokenizer.vocab_size, shard_tokens, restart)
        if start:
            print(f"continuing the interrupted preparation in {staging}: {start:,} documents done, "
                  f"{sum(len(w.files) for w in writers.values())} shard files kept")
        try:
            check_space(staging, docs, tokenizer, eot)
            done = start
            bar = progress(docs.total, f"tokenizing {out_dir.name}", initial=start)

            def write(splits, job):
                nonlocal done
                for split, ids in zip(splits, job.get()):
                    if done + 1 == docs.total and "val" not in writers:
                        split = "val"  # a corpus too small for its val fraction still validates on its last document
                    if split not in writers:
                        writers[split] = SplitWriter(staging, split, tokenizer.vocab_size, shard_tokens)
                    closed = writers[split].closed
                    writers[split].write(ids)
                    done += 1
                    if writers[split].closed != closed:  # a shard finished: record where we are
                        save_progress(staging, identity, done, writers)
                bar.update(len(splits))
                bar.set_postfix(tokens=f"{sum(w.tokens for w in writers.values()):,}", refresh=False)

            in_flight = collections.deque()
            with Encoder(tokenizer, workers or os.cpu_count() or 1, eot) as encoder:
                for batch in batches(docs.read(start), batch_chars):
                    in_flight.append(([split for split, _ in batch], encoder.submit([text for _, text in batch])))
                    if len(in_flight) > encoder.depth:
                        write(*in_flight.popleft())
                while in_flight:
                    write(*in_flight.popleft())
            bar.close()
            splits = {s: w.close() for s, w in sorted(writers.items())}
            for needed in ("train", "val"):
                s = splits.get(needed, {"tokens": 0, "documents": 0})
                if s["tokens"] <= (s["documents"] if eot and tokenizer.eot is not None else 0):  # end-of-text only
                    raise ValueError(f"no text for the {needed} split: is the input empty?")
            (staging / PROGRESS).unlink(missing_ok=True)
            meta = write_meta(staging, tokenizer, splits, docs.source, **extra)
        except BaseException:  # out_dir was never touched; the shards done stay for the next run
            if not (staging / PROGRESS).is_file():
                shutil.rmtree(staging, ignore_errors=True)
            raise
        publish(staging, out_dir, meta)
        check_complete(out_dir, meta, docs.complete)
        return meta


def begin(staging: Path, identity: dict, vocab_size: int, shard_tokens: int, restart: bool):
    """(documents already written, their split writers): from the staging folder's progress when
    the same preparation was interrupted there, else from nothing in an empty staging folder."""
    progress_file = staging / PROGRESS
    if progress_file.is_file() and not restart:
        try:
            saved = json.loads(progress_file.read_text())
        except ValueError:
            saved = {"identity": None}
        if saved["identity"] != identity:
            raise ValueError(f"{staging} holds an interrupted preparation of another input or with other "
                             f"settings: run that command again to finish it, or add --restart to discard it")
        keep = {PROGRESS}  # files begun after the record are written again
        for st in saved["splits"].values():
            keep.update(st["files"] + [name + ".tmp" for name in st["files"][-1:]])
        for f in staging.iterdir():
            if f.name not in keep:
                f.unlink()
        try:
            writers = {s: SplitWriter.resume(staging, s, vocab_size, shard_tokens, st)
                       for s, st in saved["splits"].items()}
        except DataError as e:
            raise ValueError(f"cannot continue the interrupted preparation in {staging} ({e}); "
                             f"add --restart to start over") from None
        return saved["docs"], writers
    shutil.rmtree(staging, ignore_errors=True)  # killed before its first shard, or --restart
    staging.mkdir(parents=True)
    return 0, {}


def save_progress(staging: Path, identity: dict, docs: int, writers: dict):
    """Atomically, after the files it names are on disk."""
    state = {"identity": identity, "docs": docs, "splits": {s: w.state() for s, w in writers.items()}}
    tmp = staging / (PROGRESS + ".tmp")
    with open(tmp, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(staging / PROGRESS)


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_space(staging: Path, docs: Documents, tokenizer, eot: bool):
    """Refuse, before the first token, a preparation whose files will not fit: the token files
    (a complete copy's known count, else about 4 bytes of text per GPT-2 token, 1 per byte or
    character token) and, when not streaming, what reading adds to Hugging Face's caches."""
    if docs.complete:
        tokens = docs.complete["tokens"]
    else:
        tokens = docs.text_bytes // (4 if tokenizer.name == "gpt2" else 1) + (docs.total or 0) * eot
    have = sum(f.stat().st_size for f in staging.iterdir())
    needs = [(staging, max(0, tokens * token_dtype(tokenizer.vocab_size).itemsize - have), "the token files")]
    for folder, n in (docs.cache or {}).items():
        needs.append((Path(folder), n, f"the Hugging Face cache in {folder}"))
    disks = {}
    for folder, n, what in needs:
        while not folder.exists():
            folder = folder.parent
        disk = disks.setdefault(os.stat(folder).st_dev, [folder, 0, []])
        disk[1] += n
        disk[2].append(f"{what} ~{gb(n)}")
    for folder, n, whats in disks.values():
        free = shutil.disk_usage(folder).free
        if n > free:
            hint = "; --streaming needs only the token files" if docs.cache else ""
            raise OSError(f"not enough disk space: {' and '.join(whats)} need ~{gb(n)} on the disk of "
                          f"{folder}, which has {gb(free)} free{hint}")


def check_complete(out_dir: Path, meta: dict, complete: dict | None):
    """A warning naming the shortfall when a hub dataset came out smaller than a complete copy."""
    if not complete:
        return
    docs = sum(s["documents"] for s in meta["splits"].values())
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    short = []
    if docs < complete.get("documents", 0):
        short.append(f"{complete['documents'] - docs:,} documents fewer than the {complete['documents']:,} of a complete copy")
    if tokens < 0.95 * complete["tokens"]:
        short.append(f"{tokens:,} tokens, {1 - tokens / complete['tokens']:.1%} short of about {complete['tokens']:,}")
    if short:
        print(f"warning: {out_dir} is incomplete: {'; '.join(short)} (source: {meta['source']})", file=sys.stderr)


def publish(staging: Path, out_dir: Path, meta: dict):
    """Move a complete dataset from staging into out_dir, replacing the one there. Only renames
    on one filesystem, a few milliseconds: the old meta.json goes first, so that no reader ever
    sees old and new files mixed, the new meta.json last. Only the files meta.json names move in:
    anything else in staging (a temporary no writer closed) is deleted with it, and temporaries
    an earlier version left in out_dir go too. out_dir's other files (prepare.py, a download) stay."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        old = [f for s in load_meta(out_dir)["splits"].values() for f in s["files"]]
    except DataError:  # none, or unreadable: nothing to remove
        old = []
    (out_dir / "meta.json").unlink(missing_ok=True)
    new = [f for s in meta["splits"].values() for f in s["files"]]
    for name in set(old) - set(new):
        (out_dir / name).unlink(missing_ok=True)
    for pattern in STRAYS:
        for f in out_dir.glob(pattern):
            f.unlink()
    for name in sorted(new) + ["meta.json"]:
        os.replace(staging / name, out_dir / name)
    shutil.rmtree(staging)


def batches(docs, max_chars: int):
    """Lists of (split, text) of at most max_chars characters (or one longer document). Sized by
    characters, not documents, so that work units stay even when document sizes are not."""
    batch, chars = [], 0
    for doc in docs:
        if batch and chars + len(doc[1]) > max_chars:
            yield batch
            batch, chars = [], 0
        batch.append(doc)
        chars += len(doc[1])
    if batch:
        yield batch


class Encoder:
    """Token arrays, ready to write (file dtype, end-of-text appended), for batches of texts.
    GPT-2 BPE runs on a pool of worker processes, one batch per task: on this project's 2-core
    machine tiktoken's own threads reached 1.6x a single thread, processes 1.8x. The byte and
    char tokenizers are cheap enough for the calling process."""

    def __init__(self, tokenizer, workers: int, eot: bool):
        self.tokenizer, self.eot, self.pool = tokenizer, eot, None
        self.depth = 0  # batches that may wait unwritten
        if tokenizer.name == "gpt2" and workers > 1:
            # fork starts a worker in milliseconds (spawn re-imports everything: ~1 s each).
            ctx = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            self.pool = multiprocessing.get_context(ctx).Pool(workers, initializer=_start_worker, initargs=(eot,))
            self.depth = 2 * workers  # keeps every worker busy while the main process writes

    def submit(self, texts: list[str]):
        if self.pool is not None:
            return self.pool.apply_async(_encode_batch, (texts,))
        return _Done([encode_for_file(self.tokenizer, t, self.eot) for t in texts])

    def __enter__(self):
        return self

    def __exit__(self, error, *_):
        if self.pool is None:
            return
        if error is None:  # every result taken: the workers end on the pool's own end-of-work message
            self.pool.close()
            self.pool.join()
            return
        # Batches in flight: terminate() sends SIGTERM and waits for each worker. A worker that
        # still runs a Python SIGTERM handler inherited from this process (scaling.distributed's
        # StopSignal; the initializer resets it, but a worker may not have got that far) would
        # never end, so the ones alive after STOP_SECONDS are killed outright.
        kill = threading.Timer(STOP_SECONDS, self.kill_workers)
        kill.start()
        try:
            self.pool.terminate()
        finally:
            kill.cancel()
            kill.join()

    def kill_workers(self):
        for p in list(self.pool._pool):  # the pool's worker processes
            if p.exitcode is None:
                p.kill()


def encode_for_file(tokenizer, text: str, eot: bool):
    ids = tokenizer.encode_np(text)
    if eot and tokenizer.eot is not None:
        ids = np.append(ids, tokenizer.eot)
    return ids.astype(token_dtype(tokenizer.vocab_size), copy=False)


class _Done:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


_worker = None


def _start_worker(eot: bool):
    global _worker
    # Forked with the parent's handlers: a Python SIGTERM handler (StopSignal's only takes note)
    # would keep terminate(), or a scheduler signalling the process group, from ending this worker.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the main process reports it
    _worker = (GPT2Tokenizer(), eot)


def _encode_batch(texts: list[str]):
    return [encode_for_file(_worker[0], t, _worker[1]) for t in texts]


def progress(total, desc, initial=0):
    from tqdm.auto import tqdm  # installed with `datasets`
    return tqdm(total=total, initial=initial, desc=desc, unit="doc", disable=None, mininterval=1)


# ---------------------------------------------------------------------------------------------
# Inputs: a local file or folder (how tests and offline users run), or the dataset's download.

def read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: not a file" if p.exists() else f"input not found: {path}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


# ---------------------------------------------------------------------------------------------
# The datasets. Each takes the parsed arguments and returns meta.json's content.

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def shakespeare_text(a) -> str:
    if a.input:
        return read_text(a.input)
    import urllib.request
    raw = Path(a.out) / "input.txt"
    if not raw.is_file():
        tmp = beside(a.out, "download")  # outside the dataset: a broken download never looks complete
        try:
            urllib.request.urlretrieve(SHAKESPEARE_URL, tmp)
        except NETWORK_ERRORS as e:
            tmp.unlink(missing_ok=True)
            raise no_network(SHAKESPEARE_URL, e) from None
        raw.parent.mkdir(parents=True, exist_ok=True)
        tmp.replace(raw)
    return read_text(raw)


def first_90_percent(text: str):
    """nanoGPT's Shakespeare split: the first 90% of the characters train, the rest validate."""
    cut = int(len(text) * 0.9)
    return [("train", text[:cut]), ("val", text[cut:])]


def prepare_shakespeare(a) -> dict:
    text = shakespeare_text(a)
    return write_dataset(a.out, GPT2Tokenizer(), listed(first_90_percent(text), "tiny shakespeare"),
                         workers=a.workers, eot=False, shard_tokens=a.shard_tokens, restart=a.restart)


def prepare_shakespeare_char(a) -> dict:
    text = shakespeare_text(a)
    tok = CharTokenizer("".join(sorted(set(text))))
    return write_dataset(a.out, tok, listed(first_90_percent(text), "tiny shakespeare"), workers=a.workers,
                         eot=False, shard_tokens=a.shard_tokens, restart=a.restart, chars=tok.chars)


# Where the hub keeps a whole parquet copy, first choice first: (revision, folder). OpenWebText's
# main revision holds its loading script (and the raw tar files); the hub's parquet conversion of
# it is the copy datasets 4+ can read. Counts of a complete copy: OpenWebText's published 8,013,769
# documents and nanoGPT's 9,035,582,198 + 4,434,897 tokens; FineWeb-Edu sample-10BT's ~10B GPT-2
# tokens (its name).
HUB = {
    "openwebtext": dict(repo="Skylion007/openwebtext", val_fraction=0.0005,
                        choices=[("main", ""), ("refs/convert/parquet", "plain_text")],
                        complete={"documents": 8_013_769, "tokens": 9_040_017_095},
                        otherwise="python -m venv owt-env && owt-env/bin/pip install 'datasets<4' && owt-env/bin/python "
                                  "-c \"import datasets; datasets.load_dataset('Skylion007/openwebtext', split='train', "
                                  "trust_remote_code=True).to_parquet('owt.parquet')\" && python data/openwebtext/"
                                  "prepare.py --input owt.parquet"),
    "fineweb_edu": dict(repo="HuggingFaceFW/fineweb-edu", val_fraction=0.001,
                        choices=[("main", "sample/10BT")], complete={"tokens": 10_000_000_000},
                        otherwise="huggingface-cli download HuggingFaceFW/fineweb-edu --repo-type dataset "
                                  "--include 'sample/10BT/*' --local-dir fw && python data/fineweb_edu/prepare.py "
                                  "--input fw/sample/10BT"),
}


def hub_documents(a, name: str) -> Documents:
    """The hub's complete parquet copy of a dataset, or the local input that replaces it."""
    spec = HUB[name]
    if a.input:
        return local_documents(a.input, "text", spec["val_fraction"], a.streaming, a.workers)
    try:
        pf = hub_parquet(spec["repo"], spec["choices"], "text")
    except ValueError as e:
        raise ValueError(f"{e}. Instead: {spec['otherwise']}") from None
    whole = spec["complete"].get("documents")
    if whole and sum(pf.rows) < whole:  # said now, before hours of work, and again at the end
        print(f"warning: {pf.where} holds {sum(pf.rows):,} documents, a complete copy {whole:,}", file=sys.stderr)
    return parquet_documents(pf, "text", spec["val_fraction"], a.streaming, a.workers, repo=spec["repo"],
                             revision=pf.where.split("@", 1)[1], complete=spec["complete"])


def prepare_hub(name: str):
    def prepare(a) -> dict:
        docs = hub_documents(a, name)
        return write_dataset(a.out, GPT2Tokenizer(), docs, workers=a.workers, shard_tokens=a.shard_tokens,
                             restart=a.restart, val_fraction=HUB[name]["val_fraction"])
    return prepare


def prepare_embedded(out_dir: str | Path, workers: int | None = None, shard_tokens: int = SHARD_TOKENS) -> dict:
    """Byte-level token files of the Python standard library's source (about 11 MB on 3.11)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    docs = [("val" if is_val(p.relative_to(root).as_posix()) else "train",
             p.read_text(encoding="utf-8", errors="replace")) for p in files]
    source = f"Python {sysconfig.get_python_version()} standard library source ({len(files)} files under {root})"
    return write_dataset(out_dir, ByteTokenizer(), listed(docs, source), workers=workers, shard_tokens=shard_tokens)


def dataset_dir(cfg: Config) -> Path:
    """The dataset's folder; the embedded corpus is prepared here on first use."""
    d = Path(cfg.data.root) / cfg.data.dataset
    if not (d / "meta.json").is_file():
        if cfg.data.dataset != "embedded":
            raise DataError(f"dataset '{cfg.data.dataset}' is not prepared at {d}: "
                            f"run python data/{cfg.data.dataset}/prepare.py")
        with preparing(d, wait=True):  # another run may be preparing it right now: use its result
            if not (d / "meta.json").is_file():
                print(f"preparing the embedded corpus in {d} ...", flush=True)
                prepare_embedded(d)
    return d


DATASETS = {
    "shakespeare": (prepare_shakespeare, "tiny Shakespeare, GPT-2 BPE (nanoGPT's shakespeare)"),
    "shakespeare_char": (prepare_shakespeare_char, "tiny Shakespeare, one token per character"),
    "openwebtext": (prepare_hub("openwebtext"), "OpenWebText, GPT-2 BPE, 0.05% validation (nanoGPT)"),
    "fineweb_edu": (prepare_hub("fineweb_edu"), "FineWeb-Edu sample-10BT, GPT-2 BPE, 100M-token shards"),
    "embedded": (lambda a: prepare_embedded(a.out, a.workers, a.shard_tokens), "Python standard library source, bytes"),
}


def main(name: str | None = None, argv=None):
    """The command line of data/<name>/prepare.py (and python -m scaling.prepare NAME)."""
    ap = argparse.ArgumentParser(prog=f"data/{name}/prepare.py" if name else "python -m scaling.prepare",
                                 description=DATASETS[name][1] if name else "Prepare a dataset into token files.")
    if name is None:
        ap.add_argument("name", choices=list(DATASETS))
    ap.add_argument("--input", help="instead of the download: a local .txt / .jsonl / .json / .parquet file, "
                                    "a folder of parquet files (e.g. the hub's, downloaded) or a datasets folder")
    ap.add_argument("--out", help="output folder (default data/<name>)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer / download processes")
    ap.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="tokens per shard file")
    ap.add_argument("--streaming", action="store_true",
                    help="tokenize the parquet files while reading them: no copy in the Hugging Face cache")
    ap.add_argument("--restart", action="store_true", help="discard an interrupted preparation instead of continuing it")
    ap.error = die  # one line, like every bad input, not argparse's usage block
    a = ap.parse_args(argv)
    name = name or a.name
    a.out = a.out or str(Path("data") / name)
    for opt, value in (("--workers", a.workers), ("--shard-tokens", a.shard_tokens)):
        if value < 1:
            die(f"{opt}: must be >= 1, got {value}")
    if Path(a.out).exists() and not Path(a.out).is_dir():
        die(f"--out: {a.out} is a file, not a folder")
    t0 = time.perf_counter()
    staging = staging_dir(a.out)

    def kept(message: str) -> str:  # what a run that stopped half-way leaves to continue from
        if (staging / PROGRESS).is_file() and str(staging) not in message:
            return f"{message}; the shards done are kept in {staging}: the same command continues"
        return message
    try:
        with preparing(a.out):  # before anything is written, the download included
            meta = DATASETS[name][0](a)
    except Busy as e:  # the staging folder is the other process's: nothing of ours is kept there
        die(str(e))
    except KeyboardInterrupt:
        print(kept("interrupted"), file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # bad input, no network, disk full: the dataset in --out is kept
        if is_network_error(e) and not isinstance(e, ConnectionError):  # httpx's, while reading
            e = ConnectionError(f"lost the network while reading: {type(e).__name__}: {e}")
        if not isinstance(e, (OSError, ValueError)):
            raise
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC  # the disk failed, not the input
        die(kept(" ".join(str(e).split())), code=1 if full else 2)  # one line, whatever the library put in it
    counts = ", ".join(f"{s} {v['tokens']:,} tokens in {len(v['files'])} file(s)" for s, v in meta["splits"].items())
    print(f"{name}: {counts} -> {a.out} ({time.perf_counter() - t0:.1f}s)")


if __name__ == "__main__":
    main()

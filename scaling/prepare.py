"""Dataset preparation shared by every data/<name>/prepare.py: documents -> token files.

Each dataset is a function from an input (a download by default, or a local text / JSONL /
parquet file or `datasets` folder given with --input) to documents per split; one pipeline
tokenizes them in batches on every core (a pool of worker processes for GPT-2 BPE), appends the
end-of-text token per document, and streams the ids into shards of SHARD_TOKENS tokens, so
memory stays bounded whatever the corpus size. meta.json is written last and marks a complete
dataset. Everything is written into a staging folder beside the output and moved in only once
complete: a bad input, an error or a kill never costs the dataset already there.

The embedded corpus lives here too: the Python standard library's own source, present on every
machine that runs this code, so the demo needs no download.
"""

import argparse
import collections
import hashlib
import json
import multiprocessing
import os
import shutil
import sysconfig
import time
import urllib.error
from pathlib import Path

import numpy as np

from scaling.config import die
from scaling.data import DataError, TokenWriter, load_meta, token_dtype
from scaling.tokenizer import ByteTokenizer, CharTokenizer, GPT2Tokenizer

SHARD_TOKENS = 100_000_000  # tokens per file before a split starts its next file


class SplitWriter:
    """Appends tokenized documents to <split>_<k>.bin files, starting a new file every
    shard_tokens tokens (a document may continue into the next file)."""

    def __init__(self, out_dir: Path, split: str, vocab_size: int, shard_tokens: int = SHARD_TOKENS):
        self.out_dir, self.split, self.vocab_size = out_dir, split, vocab_size
        self.shard_tokens = shard_tokens
        self.files, self.tokens, self.docs = [], 0, 0
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

    def close(self) -> dict:
        if self.writer is not None:
            self.writer.close()
        return {"files": self.files, "tokens": self.tokens, "documents": self.docs}


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


def write_dataset(out_dir: str | Path, tokenizer, docs, source: str, workers: int | None = None,
                  batch_chars: int = 1 << 20, eot: bool = True, shard_tokens: int = SHARD_TOKENS,
                  total_docs: int | None = None, **extra) -> dict:
    """Tokenize (split, text) pairs into token files under out_dir; returns meta.json's content.

    Documents go to the encoder in batches of about batch_chars characters; up to two batches
    per worker are in flight while the oldest finished one is written, in input order. Memory
    holds those batches, never the corpus. The files go to a staging folder beside out_dir (the
    same filesystem, so moving them is a rename) and replace out_dir's only when complete.
    """
    out_dir = Path(out_dir)
    staging = out_dir.resolve().with_name(f".{out_dir.resolve().name}.partial")
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
    staging.mkdir(parents=True)
    writers = {}
    bar = progress(total_docs, f"tokenizing {out_dir.name}")

    def write(splits, job):
        for split, ids in zip(splits, job.get()):
            if split not in writers:
                writers[split] = SplitWriter(staging, split, tokenizer.vocab_size, shard_tokens)
            writers[split].write(ids)
        bar.update(len(splits))
        bar.set_postfix(tokens=f"{sum(w.tokens for w in writers.values()):,}", refresh=False)

    try:
        in_flight = collections.deque()
        with Encoder(tokenizer, workers or os.cpu_count() or 1, eot) as encoder:
            for batch in batches(docs, batch_chars):
                in_flight.append(([split for split, _ in batch], encoder.submit([text for _, text in batch])))
                if len(in_flight) > encoder.depth:
                    write(*in_flight.popleft())
            while in_flight:
                write(*in_flight.popleft())
        bar.close()
        splits = {s: w.close() for s, w in writers.items()}
        for needed in ("train", "val"):
            s = splits.get(needed, {"tokens": 0, "documents": 0})
            if s["tokens"] <= (s["documents"] if eot and tokenizer.eot is not None else 0):  # end-of-text only
                raise ValueError(f"no text for the {needed} split: is the input empty?")
        meta = write_meta(staging, tokenizer, splits, source, **extra)
    except BaseException:  # an error or Ctrl-C: out_dir was never touched
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish(staging, out_dir)
    return meta


def publish(staging: Path, out_dir: Path):
    """Move a complete dataset from staging into out_dir, replacing the one there. Only renames
    on one filesystem, a few milliseconds: the old meta.json goes first, so that no reader ever
    sees old and new files mixed, the new meta.json last. out_dir's other files (prepare.py, a
    download) stay."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        old = [f for s in load_meta(out_dir)["splits"].values() for f in s["files"]]
    except DataError:  # none, or unreadable: nothing to remove
        old = []
    (out_dir / "meta.json").unlink(missing_ok=True)
    new = {f.name for f in staging.iterdir()}
    for name in set(old) - new:
        (out_dir / name).unlink(missing_ok=True)
    for name in sorted(new - {"meta.json"}) + ["meta.json"]:
        os.replace(staging / name, out_dir / name)
    staging.rmdir()


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

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()


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
    _worker = (GPT2Tokenizer(), eot)


def _encode_batch(texts: list[str]):
    return [encode_for_file(_worker[0], t, _worker[1]) for t in texts]


def progress(total, desc):
    from tqdm.auto import tqdm  # installed with `datasets`
    return tqdm(total=total, desc=desc, unit="doc", disable=None, mininterval=1)


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


# Connection failures as datasets, huggingface_hub and urllib raise them (tiktoken's: tokenizer.py).
NETWORK_ERRORS = (ConnectionError, TimeoutError, urllib.error.URLError)


def no_network(what: str, e: Exception) -> ConnectionError:
    return ConnectionError(f"no network: cannot download {what} ({e}); prepare from a local file with --input PATH")


def load_documents(path: str | Path, text_field: str = "text"):
    """A `datasets.Dataset` (or DatasetDict) from a local .txt (one document per file), .jsonl /
    .json, .parquet, or a folder written by `Dataset.save_to_disk`."""
    import datasets
    p = Path(path)
    if p.is_file() and p.stat().st_size == 0:
        raise ValueError(f"{path}: empty file")  # datasets would fail on it with a bare StopIteration
    try:
        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
        elif not p.is_file():
            raise FileNotFoundError(f"input not found: {path}")
        elif p.suffix == ".txt":
            ds = datasets.load_dataset("text", data_files=str(p), sample_by="document", split="train")
        elif p.suffix in (".jsonl", ".json"):
            ds = datasets.load_dataset("json", data_files=str(p), split="train")
        elif p.suffix == ".parquet":
            ds = datasets.load_dataset("parquet", data_files=str(p), split="train")
        else:
            raise ValueError(f"{path}: unsupported input (.txt, .jsonl, .json, .parquet or a datasets folder)")
    except datasets.exceptions.DatasetsError as e:  # a malformed row, not UTF-8: the cause says which
        raise ValueError(f"{path}: cannot read it ({e.__cause__ or e})") from None
    except ValueError as e:  # pyarrow's errors for a file that is not what its suffix says
        raise ValueError(e if str(path) in str(e) else f"{path}: cannot read it ({e})") from None
    names = ds.column_names if isinstance(ds, datasets.Dataset) else next(iter(ds.values())).column_names
    if text_field not in names:
        raise ValueError(f"{path}: no '{text_field}' column (columns: {', '.join(names)})")
    return ds


def split_documents(ds, val_fraction: float, seed: int = 2357, text_field: str = "text"):
    """(split, text) pairs: a DatasetDict's own val/validation/test split if it has one, otherwise
    a seeded random val_fraction of the documents (nanoGPT's recipe for OpenWebText)."""
    import datasets
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"the datasets folder has no 'train' split (splits: {', '.join(ds)})")
        val_name = next((n for n in ("val", "validation", "test") if n in ds), None)
        if val_name is not None:
            parts = {"train": ds["train"], "val": ds[val_name]}
        else:
            ds = ds["train"]
    if isinstance(ds, datasets.Dataset):
        n_val = max(1, round(len(ds) * val_fraction)) if len(ds) > 1 else 0
        if n_val == 0:
            raise ValueError("need at least 2 documents to make a train and a val split")
        cut = ds.train_test_split(test_size=n_val, seed=seed, shuffle=True)
        parts = {"train": cut["train"], "val": cut["test"]}
    total = sum(len(d) for d in parts.values())

    def gen():
        for split, d in parts.items():
            for rows in d.iter(batch_size=1024):
                for text in rows[text_field]:
                    if not isinstance(text, str):  # null or a number: a broken row, not a document
                        raise ValueError(f"a '{text_field}' value in the {split} split is {text!r}, not text")
                    yield split, text
    return gen(), total


# ---------------------------------------------------------------------------------------------
# The datasets. Each takes the parsed arguments and returns meta.json's content.

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def shakespeare_text(a) -> str:
    if a.input:
        return read_text(a.input)
    import urllib.request
    raw = Path(a.out) / "input.txt"
    if not raw.is_file():
        raw.parent.mkdir(parents=True, exist_ok=True)
        tmp = raw.with_name(raw.name + ".tmp")  # a broken download never looks complete
        try:
            urllib.request.urlretrieve(SHAKESPEARE_URL, tmp)
        except NETWORK_ERRORS as e:
            raise no_network(SHAKESPEARE_URL, e) from None
        tmp.replace(raw)
    return read_text(raw)


def first_90_percent(text: str):
    """nanoGPT's Shakespeare split: the first 90% of the characters train, the rest validate."""
    cut = int(len(text) * 0.9)
    return [("train", text[:cut]), ("val", text[cut:])]


def prepare_shakespeare(a) -> dict:
    text = shakespeare_text(a)
    return write_dataset(a.out, GPT2Tokenizer(), first_90_percent(text), source="tiny shakespeare",
                         workers=a.workers, eot=False, shard_tokens=a.shard_tokens)


def prepare_shakespeare_char(a) -> dict:
    text = shakespeare_text(a)
    tok = CharTokenizer("".join(sorted(set(text))))
    return write_dataset(a.out, tok, first_90_percent(text), source="tiny shakespeare",
                         workers=a.workers, eot=False, shard_tokens=a.shard_tokens, chars=tok.chars)


def hub_or_local(a, hub_name: str, **hub_kwargs):
    if a.input:
        return load_documents(a.input), a.input
    import datasets
    try:
        ds = datasets.load_dataset(hub_name, num_proc=a.workers, **hub_kwargs)
    except NETWORK_ERRORS as e:
        raise no_network(hub_name, e) from None
    return ds, f"huggingface.co/datasets/{hub_name}"


def prepare_openwebtext(a) -> dict:
    ds, source = hub_or_local(a, "Skylion007/openwebtext", split="train")
    docs, total = split_documents(ds, val_fraction=0.0005)
    return write_dataset(a.out, GPT2Tokenizer(), docs, source=source, workers=a.workers, total_docs=total,
                         shard_tokens=a.shard_tokens)


def prepare_fineweb_edu(a) -> dict:
    ds, source = hub_or_local(a, "HuggingFaceFW/fineweb-edu", name="sample-10BT", split="train")
    docs, total = split_documents(ds, val_fraction=0.001)
    return write_dataset(a.out, GPT2Tokenizer(), docs, source=source, workers=a.workers, total_docs=total,
                         shard_tokens=a.shard_tokens)


def prepare_embedded(out_dir: str | Path, workers: int | None = None, shard_tokens: int = SHARD_TOKENS) -> dict:
    """Byte-level token files of the Python standard library's source (about 11 MB on 3.11)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    docs = (("val" if is_val(p.relative_to(root).as_posix()) else "train",
             p.read_text(encoding="utf-8", errors="replace")) for p in files)
    return write_dataset(out_dir, ByteTokenizer(), docs, workers=workers, total_docs=len(files),
                         shard_tokens=shard_tokens,
                         source=f"Python {sysconfig.get_python_version()} standard library source "
                                f"({len(files)} files under {root})")


DATASETS = {
    "shakespeare": (prepare_shakespeare, "tiny Shakespeare, GPT-2 BPE (nanoGPT's shakespeare)"),
    "shakespeare_char": (prepare_shakespeare_char, "tiny Shakespeare, one token per character"),
    "openwebtext": (prepare_openwebtext, "OpenWebText, GPT-2 BPE, 0.05% validation (nanoGPT)"),
    "fineweb_edu": (prepare_fineweb_edu, "FineWeb-Edu sample-10BT, GPT-2 BPE, 100M-token shards"),
    "embedded": (lambda a: prepare_embedded(a.out, a.workers, a.shard_tokens), "Python standard library source, bytes"),
}


def main(name: str | None = None, argv=None):
    """The command line of data/<name>/prepare.py (and python -m scaling.prepare NAME)."""
    ap = argparse.ArgumentParser(prog=f"data/{name}/prepare.py" if name else "python -m scaling.prepare",
                                 description=DATASETS[name][1] if name else "Prepare a dataset into token files.")
    if name is None:
        ap.add_argument("name", choices=list(DATASETS))
    ap.add_argument("--input", help="local .txt / .jsonl / .parquet file or datasets folder instead of the download")
    ap.add_argument("--out", help="output folder (default data/<name>)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer / download processes")
    ap.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="tokens per shard file")
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
    try:
        meta = DATASETS[name][0](a)
    except (OSError, ValueError) as e:  # bad input, no network, disk full: the dataset in --out is kept
        die(str(e))
    counts = ", ".join(f"{s} {v['tokens']:,} tokens in {len(v['files'])} file(s)" for s, v in meta["splits"].items())
    print(f"{name}: {counts} -> {a.out} ({time.perf_counter() - t0:.1f}s)")


if __name__ == "__main__":
    main()

"""Token files: their format, writing them, and reading one split as fixed-length windows.

A dataset is a folder: meta.json (tokenizer, vocab size, token counts, source) and, per split,
one or more token files `<split>_<k>.bin`. A token file is a 64-byte header (magic, format
version, bytes per token, token count) followed by the ids as little-endian uint16 (uint32 when
the vocabulary does not fit in 16 bits). Files are read through np.memmap, never loaded whole.

A split is cut into non-overlapping windows of seq_len + 1 tokens (inputs and their next-token
targets); scaling.loader decides which window each rank reads at each step. Validation and eval
read the fixed windows (starting at multiples of seq_len in each file); training reads each epoch
through a view whose windows start at an offset drawn for that epoch (TokenWindows.shifted).
"""

import json
import os
import struct
from pathlib import Path

import numpy as np

from scaling.tokenizer import TOKENIZERS, ByteTokenizer, GPT2Tokenizer

MAGIC = b"SCALTOK\x00"
VERSION = 1
HEADER = struct.Struct("<8sIIQ")  # magic, version, bytes per token, token count
HEADER_BYTES = 64
DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


class DataError(ValueError):
    pass


def token_dtype(vocab_size: int) -> np.dtype:
    return DTYPES[2] if vocab_size <= 2**16 else DTYPES[4]


class TokenWriter:
    """Streams token ids into one token file. Written under a temporary name and renamed on
    close, so a crash never leaves a file that looks complete."""

    def __init__(self, path: str | Path, vocab_size: int, resume_count: int | None = None):
        """resume_count: continue an unfinished file after its first resume_count tokens (what
        was written after them is dropped); the temporary file must hold at least that many."""
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.dtype = token_dtype(vocab_size)
        if resume_count is None:
            self.count = 0
            self.f = open(self.tmp, "wb")
            self.f.write(b"\0" * HEADER_BYTES)
        else:
            size = HEADER_BYTES + resume_count * self.dtype.itemsize
            if not self.tmp.exists() and self.path.is_file():  # finished after the count was recorded
                os.replace(self.path, self.tmp)
            if not self.tmp.is_file() or self.tmp.stat().st_size < size:
                raise DataError(f"{self.tmp}: holds fewer than the {resume_count} tokens recorded")
            self.count = resume_count
            self.f = open(self.tmp, "r+b")
            self.f.truncate(size)
            self.f.seek(size)

    def write(self, ids):
        a = np.ascontiguousarray(ids, dtype=self.dtype)
        self.f.write(memoryview(a).cast("B"))  # no extra copy of the bytes
        self.count += a.size

    def close(self) -> int:
        self.f.seek(0)
        self.f.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.count))
        self.sync()
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.count

    def sync(self):
        """On disk, not just in the page cache: a record of progress may now name this file."""
        self.f.flush()
        os.fsync(self.f.fileno())


def write_tokens(path: str | Path, ids, vocab_size: int) -> int:
    w = TokenWriter(path, vocab_size)
    w.write(ids)
    return w.close()


def read_header(path: str | Path) -> tuple[int, int]:
    """A token file's bytes per token and token count, its header checked against its size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
    except OSError as e:  # missing, a folder, no permission
        raise DataError(f"{path}: cannot read the token file ({e.strerror}); prepare the dataset again") from None
    if len(head) < HEADER.size or head[:8] != MAGIC:
        raise DataError(f"{path}: not a token file (bad magic; was it written by scaling's prepare?)")
    _, version, itemsize, count = HEADER.unpack(head)
    if version != VERSION or itemsize not in DTYPES:
        raise DataError(f"{path}: unsupported token file (version {version}, {itemsize} bytes per token)")
    if size != HEADER_BYTES + count * itemsize:
        raise DataError(f"{path}: truncated or padded: header says {count} tokens, "
                        f"file holds {(size - HEADER_BYTES) / itemsize:.0f}")
    return itemsize, count


def read_tokens(path: str | Path) -> np.ndarray:
    """Memory-map a token file after checking its header against its size."""
    itemsize, count = read_header(path)
    return np.memmap(path, dtype=DTYPES[itemsize], mode="r", offset=HEADER_BYTES, shape=(count,))


def tokenizer_spec(meta: dict) -> dict:
    """The tokenizer as checkpoints record it (tokenizer.json): name, vocab_size, eot, chars."""
    spec = {k: meta[k] for k in ("tokenizer", "vocab_size", "eot", "chars") if k in meta}
    spec["name"] = spec.pop("tokenizer")
    return spec


def load_meta(data_dir: str | Path) -> dict:
    """meta.json, checked here once so that every reader may index it without a traceback, and
    checked against itself and its token files' headers (64 bytes each, never the tokens): a
    vocabulary that disagrees with its alphabet or its files would train, then sample wrongly."""
    meta_path = Path(data_dir) / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"no prepared dataset at {data_dir}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError as e:  # not UTF-8 or not JSON
        raise DataError(f"{meta_path}: not valid JSON ({e}); prepare the dataset again") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    for key, kind, what in (("tokenizer", str, "a string"), ("vocab_size", int, "an integer"),
                            ("splits", dict, "an object")):
        if key not in meta:
            raise DataError(f"{meta_path}: missing key '{key}'; prepare the dataset again")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):  # True is an int to Python
            raise DataError(f"{meta_path}: '{key}' should be {what}, got {meta[key]!r}")
    if meta["tokenizer"] not in TOKENIZERS:
        raise DataError(f"{meta_path}: unknown tokenizer {meta['tokenizer']!r} ({', '.join(TOKENIZERS)})")
    if meta["tokenizer"] == "char" and not isinstance(meta.get("chars"), str):
        raise DataError(f"{meta_path}: missing key 'chars' (the char tokenizer's alphabet)")
    vocab, chars = meta["vocab_size"], meta.get("chars")
    if vocab < 1:
        raise DataError(f"{meta_path}: 'vocab_size' should be >= 1, got {vocab}")
    own = {"byte": ByteTokenizer.vocab_size, "gpt2": GPT2Tokenizer.vocab_size}.get(meta["tokenizer"])
    if own is not None and vocab != own:
        raise DataError(f"{meta_path}: 'vocab_size' is {vocab}, but the {meta['tokenizer']} tokenizer has {own} tokens")
    if meta["tokenizer"] == "char" and not len(chars) == len(set(chars)) == vocab:
        raise DataError(f"{meta_path}: 'chars' holds {len(chars)} characters ({len(set(chars))} distinct), "
                        f"but 'vocab_size' is {vocab}; prepare the dataset again")
    eot = meta.get("eot")
    if eot is not None and (not isinstance(eot, int) or isinstance(eot, bool) or not 0 <= eot < vocab):
        raise DataError(f"{meta_path}: 'eot' should be a token id below 'vocab_size' {vocab}, got {eot!r}")
    for split, s in meta["splits"].items():
        if not isinstance(s, dict) or not isinstance(s.get("files"), list) or not all(
                isinstance(f, str) for f in s["files"]):
            raise DataError(f"{meta_path}: missing key 'splits.{split}.files' (a list of token files)")
        count = 0
        for f in s["files"]:
            itemsize, n = read_header(Path(data_dir) / f)
            if vocab > 256 ** itemsize:
                raise DataError(f"{Path(data_dir) / f}: {itemsize} bytes per token cannot hold the ids of "
                                f"'vocab_size' {vocab} in {meta_path}; prepare the dataset again")
            count += n
        if "tokens" in s and s["tokens"] != count:
            raise DataError(f"{meta_path}: 'splits.{split}.tokens' is {s['tokens']!r}, but its token files hold "
                            f"{count}; prepare the dataset again")
    return meta


class TokenWindows:
    """One split of a dataset as W windows of seq_len + 1 tokens, across all its token files."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int):
        meta = load_meta(data_dir)
        if split not in meta["splits"]:
            raise DataError(f"{data_dir}: no '{split}' split")
        self.seq_len, self.split, self.vocab_size = seq_len, split, meta["vocab_size"]
        self.paths = [Path(data_dir) / f for f in meta["splits"][split]["files"]]
        self.files = [read_tokens(p) for p in self.paths]
        self.lengths = [len(t) for t in self.files]
        # Windows never straddle two files; the last partial window of each file is dropped.
        self._layout([max(0, (n - 1) // seq_len) for n in self.lengths], [0] * len(self.files))
        if self.num_windows == 0:
            raise DataError(f"{data_dir}: '{split}' split has fewer than {seq_len + 1} tokens")

    def _layout(self, counts: list[int], offsets: list[int]):
        """Windows of file f: counts[f] of them, the first offsets[f] tokens into it."""
        self.counts, self.offsets = counts, offsets
        self.starts = np.cumsum([0] + counts)
        self.num_windows = int(self.starts[-1])

    def shifted(self, offset: int) -> "TokenWindows":
        """The same files as windows starting `offset` (0 <= offset < seq_len) tokens into each file:
        how the training loader reads an epoch, so that contexts do not begin at the same tokens in
        every epoch. A file holds the same number of windows at every offset, so num_windows does
        not depend on it: those that fit after seq_len - 1 tokens, which reserves one window of
        slack unless the file's spare tokens already make room. A file of a single window keeps
        it, its offset cut to the room it has. A view: these windows (validation's) do not move."""
        view = object.__new__(type(self))  # a subclass's rows() still applies; no file is mapped again
        view.__dict__.update(self.__dict__)
        counts = [max(min(c, 1), (n - self.seq_len) // self.seq_len) for n, c in zip(self.lengths, self.counts)]
        view._layout(counts, [offset % max(1, n - c * self.seq_len) for n, c in zip(self.lengths, counts)])
        return view

    def __getstate__(self):
        """Pickled by path (a loader worker started by spawn or forkserver maps the files again):
        a pickled memmap would carry its whole file."""
        return {**self.__dict__, "files": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.files = [read_tokens(p) for p in self.paths]

    def _file(self, w: int) -> int:
        return int(np.searchsorted(self.starts, w, side="right")) - 1

    def _slice(self, w: int) -> np.ndarray:
        f = self._file(w)
        off = self.offsets[f] + (w - int(self.starts[f])) * self.seq_len
        return self.files[f][off: off + self.seq_len + 1]

    def rows(self, ws: list[int]) -> np.ndarray:
        """Windows ws as int64 rows, their ids checked against the vocabulary: past here an id
        out of range is an index error deep in the embedding (a device-side assert on GPU). One
        max over the rows about to be copied anyway costs nothing measurable."""
        rows = np.stack([self._slice(w) for w in ws])
        if rows.size and int(rows.max()) >= self.vocab_size:
            w = ws[int(np.argmax(rows.max(axis=1) >= self.vocab_size))]
            raise DataError(f"{self.paths[self._file(w)]}: token id {int(self._slice(w).max())} in the "
                            f"'{self.split}' split is >= vocab_size {self.vocab_size} of meta.json: the file "
                            f"is corrupt or from another tokenizer; prepare the dataset again")
        return rows.astype(np.int64)

    def window(self, w: int) -> np.ndarray:
        """Window w (seq_len + 1 ids), checked as rows() checks a batch."""
        return self.rows([w])[0]

"""Where a preparation's documents come from: one fixed order, readable from any document on.

Inputs are either parquet files (the Hugging Face hub's copies of OpenWebText and FineWeb-Edu,
listed from the repository and read through `datasets` as hf:// data files; or a local folder
laid out the same way, e.g. a download of the repository), or one local .txt / .jsonl / .json /
.parquet file or a folder written by `Dataset.save_to_disk`.

The order is the files' order, then the rows' order within a file, in both reading modes: cached
(datasets downloads every file and converts it to Arrow in its cache first, as nanoGPT does) and
streaming (rows are read while downloading; the cache stays empty). A streamed and a cached
preparation therefore see the same documents in the same order, and an interrupted one restarts
at its document: with the files' row counts (from their parquet footers) that is a file and a row.

Datasets with a loading script (OpenWebText's `openwebtext.py`) no longer load with datasets 4+
("Dataset scripts are no longer supported"); their parquet conversion on the hub does, so that
is what the hub source reads, checked to be complete before the first token is written.
"""

import bisect
import hashlib
import itertools
import os
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import quote

# Connection failures as the standard library raises them; huggingface_hub (httpx) and requests
# use classes of their own, recognised by name in is_network_error.
NETWORK_ERRORS = (ConnectionError, TimeoutError, urllib.error.URLError)
NETWORK_ERROR_NAMES = {"ConnectError", "ConnectTimeout", "TransportError", "OfflineModeIsEnabled",
                       "LocalEntryNotFoundError", "ConnectionError", "Timeout"}


def is_network_error(e: BaseException | None) -> bool:
    """True when e, or an exception it was raised from, is a failure to reach a server."""
    while e is not None:
        if isinstance(e, NETWORK_ERRORS) or NETWORK_ERROR_NAMES & {c.__name__ for c in type(e).__mro__}:
            return True
        e = e.__cause__ or e.__context__
    return False


def no_network(what: str, e: BaseException) -> ConnectionError:
    return ConnectionError(f"no network: cannot download {what} ({e}); prepare from a local file with --input PATH")


def val_by_hash(text: str, fraction: float) -> str:
    """'val' for a stable `fraction` of documents, decided by the text alone: the same document is
    in the same split in every mode, order and source, and a resumed run decides as the first."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return "val" if h < fraction * 2**64 else "train"


@dataclass
class Documents:
    """What a preparation reads: (split, text) pairs from any document on, and what it will cost."""
    source: str                                      # meta.json's "source"
    read: Callable[[int], Iterator[tuple[str, str]]]  # the pairs from document `start` on
    fingerprint: list                                # identifies the input when resuming
    total: int | None = None                         # documents, when known before reading
    text_bytes: int = 0                              # size of the text: the output estimate
    cache: dict | None = None                        # {folder: bytes} reading adds to HF caches
    complete: dict | None = None                     # {"documents", "tokens"} of a complete copy


def listed(pairs, source: str) -> Documents:
    """Documents from (split, text) pairs: a list, or a generator (read once, never held whole)."""
    sized = isinstance(pairs, (list, tuple))
    return Documents(source, lambda start: itertools.islice(iter(pairs), start, None),
                     fingerprint=[source, len(pairs) if sized else None], total=len(pairs) if sized else None,
                     text_bytes=sum(len(t) for _, t in pairs) if sized else 0)


# ---------------------------------------------------------------------------------------------
# Parquet files: the hub's, or a local folder laid out like the hub.

@dataclass
class ParquetFiles:
    where: str          # the repository and revision, or the local folder
    urls: list[str]     # hf://... or local paths, in reading order
    rows: list[int]     # per file, from its footer
    sizes: list[int]    # bytes per file (the download)
    text_bytes: int     # uncompressed size of the text column, all files


def parquet_layout(paths: list[str], where: str) -> list[str]:
    """The parquet files among a repository's (or folder's) paths, in order; one line of why not
    when they are not a complete copy: only a loading script, or the hub's partial conversion
    (it converts just the first ~5 GB of a big dataset, into 'partial-<split>' folders)."""
    parquet = sorted(p for p in paths if p.endswith(".parquet"))
    partial = [p for p in parquet if any(part.startswith("partial-") for part in p.split("/"))]
    if partial:
        raise ValueError(f"{where}: a partial parquet conversion ({partial[0].rsplit('/', 1)[0]}/), not the whole dataset")
    if not parquet:
        scripts = [p for p in paths if p.endswith(".py") and "/" not in p]
        if scripts:
            raise ValueError(f"{where}: only a dataset script ({scripts[0]}), which datasets 4 and later no longer "
                             f"run (\"Dataset scripts are no longer supported\")")
        raise ValueError(f"{where}: no parquet files")
    return parquet


def parquet_footers(urls: list[str], text_field: str) -> tuple[list[int], int]:
    """(rows per file, uncompressed bytes of the text column) from the files' footers: a few
    small reads per file, also over hf://."""
    import fsspec
    import pyarrow.parquet as pq

    def footer(url):
        try:
            with fsspec.open(url, "rb") as f:
                md = pq.ParquetFile(f).metadata
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            if is_network_error(e):
                raise
            raise ValueError(f"{url}: not a readable parquet file ({e})") from None
        names = [md.schema.column(i).name for i in range(md.num_columns)]
        if text_field not in names:
            raise ValueError(f"{url}: no '{text_field}' column (columns: {', '.join(names)})")
        col = names.index(text_field)
        return md.num_rows, sum(md.row_group(g).column(col).total_uncompressed_size for g in range(md.num_row_groups))

    with ThreadPoolExecutor(16) as pool:
        found = list(pool.map(footer, urls))
    return [r for r, _ in found], sum(b for _, b in found)


def local_parquet(folder: Path, text_field: str) -> ParquetFiles:
    paths = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    files = parquet_layout(paths, str(folder))
    urls = [str(folder / f) for f in files]
    rows, text_bytes = parquet_footers(urls, text_field)
    return ParquetFiles(str(folder), urls, rows, [os.path.getsize(u) for u in urls], text_bytes)


def hub_parquet(repo: str, choices: list[tuple[str, str]], text_field: str) -> ParquetFiles:
    """The first complete parquet copy of a hub dataset among (revision, folder) choices."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    why = []
    for revision, folder in choices:
        where = f"{repo}@{revision}"
        try:
            tree = HfApi().list_repo_tree(repo, folder or None, recursive=True, revision=revision, repo_type="dataset")
            found = {f.path: f.size for f in tree if hasattr(f, "size")}
            files = parquet_layout(list(found), where)
            urls = [f"hf://datasets/{repo}@{quote(revision, safe='')}/{f}" for f in files]
            rows, text_bytes = parquet_footers(urls, text_field)
        except ValueError as e:  # not a complete copy: say why, try the next
            why.append(str(e))
            continue
        except RevisionNotFoundError:
            why.append(f"{where}: no such revision")
            continue
        except EntryNotFoundError:
            why.append(f"{where}: no folder {folder}")
            continue
        except RepositoryNotFoundError:
            raise ValueError(f"{repo}: no such dataset repository on the hub") from None
        except Exception as e:
            if is_network_error(e):
                raise no_network(repo, e) from None
            raise
        return ParquetFiles(where, urls, rows, [found[f] for f in files], text_bytes)
    raise ValueError(f"no complete parquet copy of {repo} on the hub: {'; '.join(why)}")


def read_parquet(pf: ParquetFiles, text_field: str, split: Callable[[str], str], streaming: bool,
                 workers: int) -> Callable[[int], Iterator[tuple[str, str]]]:
    def read(start: int):
        import datasets
        ends = list(itertools.accumulate(pf.rows))  # documents up to the end of each file
        if start >= ends[-1]:
            return
        if streaming:  # from the file holding document `start`, skipping the rows before it
            k = bisect.bisect_right(ends, start)
            skip = start - (ends[k - 1] if k else 0)
            ds = datasets.load_dataset("parquet", data_files=pf.urls[k:], split="train", streaming=True,
                                       columns=[text_field]).skip(skip)
        else:  # every file downloaded and converted first; then any row is at hand
            ds = datasets.load_dataset("parquet", data_files=pf.urls, split="train", columns=[text_field],
                                       num_proc=min(workers, len(pf.urls)) if workers > 1 else None).skip(start)
        for rows in ds.iter(batch_size=1024):
            for text in rows[text_field]:
                if not isinstance(text, str):
                    raise ValueError(f"{pf.where}: a '{text_field}' value is {text!r}, not text")
                yield split(text), text
    return read


def hf_cache_needs(pf: ParquetFiles, text_field: str, repo: str | None, revision: str | None) -> dict:
    """{folder: bytes} a cached (not streamed) read adds to Hugging Face's caches: the downloads
    not already in the hub cache, and the Arrow copy of the text unless datasets has it."""
    import datasets
    from datasets import config
    needs = {}
    if repo is not None:
        from huggingface_hub import constants, try_to_load_from_cache
        prefix = f"hf://datasets/{repo}@{quote(revision, safe='')}/"
        missing = sum(size for url, size in zip(pf.urls, pf.sizes)
                      if not isinstance(try_to_load_from_cache(repo, url.removeprefix(prefix), revision=revision,
                                                               repo_type="dataset"), str))
        needs[constants.HF_HUB_CACHE] = missing
    builder = datasets.load_dataset_builder("parquet", data_files=pf.urls, columns=[text_field])
    if not os.path.exists(os.path.join(builder.cache_dir, config.DATASET_INFO_FILENAME)):
        needs[str(config.HF_DATASETS_CACHE)] = pf.text_bytes
    return needs


def parquet_documents(pf: ParquetFiles, text_field: str, val_fraction: float, streaming: bool, workers: int,
                      repo: str | None = None, revision: str | None = None,
                      complete: dict | None = None) -> Documents:
    source = f"{pf.where}: {len(pf.urls)} parquet files, {sum(pf.rows):,} documents"
    return Documents(source=source, total=sum(pf.rows), text_bytes=pf.text_bytes, complete=complete,
                     read=read_parquet(pf, text_field, lambda t: val_by_hash(t, val_fraction), streaming, workers),
                     fingerprint=[pf.where, [Path(u).name for u in pf.urls], pf.rows, pf.sizes, val_fraction],
                     cache=None if streaming else hf_cache_needs(pf, text_field, repo, revision))


# ---------------------------------------------------------------------------------------------
# One local file or a saved datasets folder.

def load_documents(path: str | Path, text_field: str = "text"):
    """A `datasets.Dataset` (or DatasetDict) from a local .txt (one document per file), .jsonl /
    .json, or a folder written by `Dataset.save_to_disk`."""
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


def dataset_documents(ds, path: str, val_fraction: float, text_field: str = "text") -> Documents:
    """(split, text) pairs of a loaded dataset: a DatasetDict's own val/validation/test split if it
    has one (train first, then val), otherwise val_fraction of the documents chosen by hash."""
    import datasets
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"the datasets folder has no 'train' split (splits: {', '.join(ds)})")
        val_name = next((n for n in ("val", "validation", "test") if n in ds), None)
        parts = [("train", ds["train"]), ("val", ds[val_name])] if val_name else [(None, ds["train"])]
    else:
        parts = [(None, ds)]

    def read(start: int):
        for split, d in parts:
            if start >= len(d):
                start -= len(d)
                continue
            for rows in d.skip(start).iter(batch_size=1024):
                for text in rows[text_field]:
                    if not isinstance(text, str):  # null or a number: a broken row, not a document
                        raise ValueError(f"{path}: a '{text_field}' value is {text!r}, not text")
                    yield split or val_by_hash(text, val_fraction), text
            start = 0
    sizes = [len(d) for _, d in parts]
    size = sum(os.path.getsize(f) for f in Path(path).rglob("*") if f.is_file()) if Path(path).is_dir() else os.path.getsize(path)
    return Documents(source=path, read=read, total=sum(sizes), text_bytes=size,
                     fingerprint=[Path(path).name, size, sizes, val_fraction])


def local_documents(path: str, text_field: str, val_fraction: float, streaming: bool, workers: int) -> Documents:
    """Any --input: a parquet file or a folder of them, a .txt / .jsonl / .json, a saved dataset."""
    p = Path(path)
    is_saved = p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file())
    if p.suffix == ".parquet" and p.is_file() or p.is_dir() and not is_saved:
        if p.is_file():
            rows, text_bytes = parquet_footers([str(p)], text_field)
            pf = ParquetFiles(str(p), [str(p)], rows, [p.stat().st_size], text_bytes)
        else:
            pf = local_parquet(p, text_field)
        return parquet_documents(pf, text_field, val_fraction, streaming, workers)
    return dataset_documents(load_documents(p, text_field), path, val_fraction, text_field)

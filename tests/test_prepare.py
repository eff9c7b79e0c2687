"""data/<name>/prepare.py, offline on local inputs: token counts, splits, shards, errors."""

import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import tiktoken

from conftest import ROOT, SHAKESPEARE
from scaling.data import TokenWindows, load_meta, read_tokens
from scaling.sources import listed, parquet_footers, val_by_hash


def run_script(name, *args, check=True):
    """Run data/<name>/prepare.py as a user would."""
    p = subprocess.run([sys.executable, str(ROOT / "data" / name / "prepare.py"), *map(str, args)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check and p.returncode:
        raise AssertionError(p.stderr)
    return p


def tokens(out, split):
    meta = load_meta(out)
    return [int(t) for f in meta["splits"][split]["files"] for t in read_tokens(out / f)]


def test_shakespeare_counts_equal_tiktoken_on_nanogpts_90_10_split(tmp_path):
    run_script("shakespeare", "--input", SHAKESPEARE, "--out", tmp_path)
    text = SHAKESPEARE.read_text()
    cut = int(len(text) * 0.9)
    enc = tiktoken.get_encoding("gpt2")
    assert tokens(tmp_path, "train") == enc.encode_ordinary(text[:cut])
    assert tokens(tmp_path, "val") == enc.encode_ordinary(text[cut:])
    meta = load_meta(tmp_path)
    assert (meta["tokenizer"], meta["vocab_size"]) == ("gpt2", 50257)
    assert (meta["splits"]["train"]["tokens"], meta["splits"]["val"]["tokens"]) == (301_966, 36_059)  # nanoGPT's


def test_shakespeare_char_uses_the_65_character_alphabet(tmp_path):
    run_script("shakespeare_char", "--input", SHAKESPEARE, "--out", tmp_path)
    meta = load_meta(tmp_path)
    assert meta["vocab_size"] == 65 and meta["tokenizer"] == "char"
    assert (meta["splits"]["train"]["tokens"], meta["splits"]["val"]["tokens"]) == (1_003_854, 111_540)
    assert "".join(meta["chars"][i] for i in tokens(tmp_path, "train")[:10]) == SHAKESPEARE.read_text()[:10]


def documents(n=2000):
    lines = SHAKESPEARE.read_text().split("\n\n")
    return [lines[i % len(lines)] + f" ({i})" for i in range(n)]


def expected_tokens(texts):
    enc = tiktoken.get_encoding("gpt2")
    return sum(len(enc.encode_ordinary(t)) + 1 for t in texts)  # + the end-of-text token


def test_openwebtext_from_a_local_jsonl_holds_every_document_once_with_eot(tmp_path):
    docs = documents(4000)
    src = tmp_path / "owt.jsonl"
    src.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs)))
    run_script("openwebtext", "--input", src, "--out", tmp_path / "out")
    meta = load_meta(tmp_path / "out")
    s = meta["splits"]
    val = [t for t in docs if val_by_hash(t, 0.0005) == "val"]  # 0.05% by hash of the text
    assert s["val"]["documents"] == len(val) and 0 < len(val) < 10
    assert s["train"]["documents"] + s["val"]["documents"] == 4000
    assert s["train"]["tokens"] + s["val"]["tokens"] == expected_tokens(docs)
    ids = tokens(tmp_path / "out", "val")
    assert ids.count(50256) == len(val) and ids[-1] == 50256
    assert ids == [t for x in val for t in tiktoken.get_encoding("gpt2").encode_ordinary(x) + [50256]]


def test_a_corpus_too_small_for_its_val_fraction_validates_on_its_last_document(tmp_path):
    docs = documents(10)
    assert all(val_by_hash(t, 0.0005) == "train" for t in docs)
    datasets.Dataset.from_dict({"text": docs}).to_parquet(tmp_path / "few.parquet")
    run_script("openwebtext", "--input", tmp_path / "few.parquet", "--out", tmp_path / "out")
    s = load_meta(tmp_path / "out")["splits"]
    assert (s["train"]["documents"], s["val"]["documents"]) == (9, 1)
    assert s["val"]["tokens"] == expected_tokens(docs[-1:])


def test_files_do_not_depend_on_workers_or_batch_size(tmp_path):
    # Small batches keep many in flight on 3 processes: results must still be written in input order.
    from scaling.prepare import write_dataset
    from scaling.tokenizer import GPT2Tokenizer
    docs = [("val" if i % 7 == 0 else "train", t) for i, t in enumerate(documents(300))]
    for name, workers, batch_chars in (("one", 1, 1 << 20), ("many", 3, 2_000)):
        write_dataset(tmp_path / name, GPT2Tokenizer(), listed(docs, "test"), workers=workers,
                      batch_chars=batch_chars, shard_tokens=5_000)
    one, many = load_meta(tmp_path / "one"), load_meta(tmp_path / "many")
    assert one["splits"] == many["splits"] and len(one["splits"]["train"]["files"]) > 2
    enc = tiktoken.get_encoding("gpt2")
    for split in ("train", "val"):
        texts = [t for s, t in docs if s == split]
        assert tokens(tmp_path / "many", split) == [t for x in texts for t in enc.encode_ordinary(x) + [50256]]
        for f in one["splits"][split]["files"]:
            assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "many" / f).read_bytes()


def test_fineweb_edu_from_a_local_parquet_splits_into_shards(tmp_path):
    docs = documents(1000)
    datasets.Dataset.from_dict({"text": docs}).to_parquet(tmp_path / "fw.parquet")
    run_script("fineweb_edu", "--input", tmp_path / "fw.parquet", "--out", tmp_path / "out", "--shard-tokens", 10_000)
    meta = load_meta(tmp_path / "out")
    files = meta["splits"]["train"]["files"]
    assert len(files) > 3 and files[0] == "train_000000.bin"
    assert all(len(read_tokens(tmp_path / "out" / f)) == 10_000 for f in files[:-1])
    total = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    assert total == expected_tokens(docs)
    assert TokenWindows(tmp_path / "out", "train", 64).num_windows > 0


def test_a_saved_datasets_folder_keeps_its_own_validation_split(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": documents(50)}),
                               "validation": datasets.Dataset.from_dict({"text": documents(7)})})
    dd.save_to_disk(tmp_path / "hf")
    run_script("openwebtext", "--input", tmp_path / "hf", "--out", tmp_path / "out")
    s = load_meta(tmp_path / "out")["splits"]
    assert (s["train"]["documents"], s["val"]["documents"]) == (50, 7)


def write(name, text):
    return lambda d: (d / name).write_text(text) and d / name


def hub_folder(root, path, docs=None):
    """A folder laid out as a hub dataset repository: parquet files at `path`, or other files."""
    f = root / "repo" / path
    f.parent.mkdir(parents=True, exist_ok=True)
    if f.suffix == ".parquet":
        datasets.Dataset.from_dict({"text": docs or documents(20)}).to_parquet(f)
    else:
        f.write_text("# a loading script\n")
    return root / "repo"


@pytest.mark.parametrize("make_input, message", [
    (lambda d: d / "missing.jsonl", "input not found"),
    (write("x.csv", "a,b"), "unsupported input"),
    (write("x.jsonl", '{"body": "hi"}\n{"body": "yo"}\n'), "no 'text' column"),
    (lambda d: (d / "x.jsonl").touch() or d / "x.jsonl", "x.jsonl: empty file"),
    (write("x.jsonl", '{"text": "a"}\n{bad\n'), "x.jsonl: cannot read it (JSON parse error"),
    (write("x.jsonl", '{"text": null}\n{"text": "a"}\n{"text": "b"}\n'), "x.jsonl: a 'text' value is None"),
    (write("x.parquet", "not parquet"), "x.parquet: not a readable parquet file"),
    (lambda d: hub_folder(d, "plain_text/partial-train/0000.parquet"), "a partial parquet conversion (plain_text/partial-train/)"),
    (lambda d: hub_folder(d, "openwebtext.py"), "only a dataset script (openwebtext.py), which datasets 4 and later no longer run"),
    (write("x.jsonl", '{"text": ""}\n{"text": ""}\n'), "no text for the train split"),
], ids=["missing", "csv", "no-text-column", "empty", "malformed", "null-text", "not-parquet", "partial-conversion",
        "script-only", "only-empty-texts"])
def test_bad_input_is_a_one_line_error_and_leaves_no_dataset(make_input, message, tmp_path):
    p = run_script("openwebtext", "--input", make_input(tmp_path), "--out", tmp_path / "out", check=False)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    # One error line, the last thing printed (datasets may report its progress before it).
    assert p.returncode == 2 and len(errors) == 1 and message in errors[0], p.stderr
    assert p.stderr.splitlines()[-1] == errors[0]
    assert not (tmp_path / "out" / "meta.json").exists()


# Preparing never costs the dataset already in --out: bad input, no network or a kill leave it as it was.

def snapshot(folder):
    """Every file under folder: its bytes and its modification time."""
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_empty_input_exits_2_and_leaves_the_prepared_dataset_byte_identical(tmp_path):
    run_script("shakespeare_char", "--input", SHAKESPEARE, "--out", tmp_path / "out")
    before = snapshot(tmp_path / "out")
    (tmp_path / "empty.txt").write_text("")
    p = run_script("shakespeare_char", "--input", tmp_path / "empty.txt", "--out", tmp_path / "out", check=False)
    assert p.returncode == 2 and p.stderr == "error: no text for the train split: is the input empty?\n", p.stderr
    assert snapshot(tmp_path / "out") == before
    assert sorted(x.name for x in tmp_path.iterdir()) == [".out.lock", "empty.txt", "out"]  # no staging folder left


def test_the_new_dataset_is_written_beside_out_and_moved_in_only_when_complete(tmp_path):
    from scaling.prepare import write_dataset
    from scaling.tokenizer import ByteTokenizer
    out = tmp_path / "out"
    write_dataset(out, ByteTokenizer(), listed([("train", "old train"), ("val", "old val")], "old"))
    before = snapshot(out)
    seen = {}

    def docs():  # a preparation that is killed after writing part of its files
        for i in range(50):
            yield ("val" if i % 10 == 0 else "train"), "new document " * 100
        seen["out"], seen["staging"] = snapshot(out), snapshot(tmp_path / ".out.partial")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        write_dataset(out, ByteTokenizer(), listed(docs(), "new"), batch_chars=1000, shard_tokens=20_000)
    assert seen["out"] == before and len(seen["staging"]) >= 3  # new shards were being written beside
    assert snapshot(out) == before  # the shards done stay beside, for the same command to continue
    assert json.loads((tmp_path / ".out.partial" / "progress.json").read_text())["docs"] > 0


def test_a_new_dataset_replaces_the_old_files_and_keeps_the_others(tmp_path):
    from scaling.prepare import write_dataset
    from scaling.tokenizer import ByteTokenizer
    out = tmp_path / "out"
    write_dataset(out, ByteTokenizer(), listed([("train", "x" * 50_000), ("val", "y")], "old"), shard_tokens=10_000)
    (out / "prepare.py").write_text("# the script lives in data/<name>/ too\n")
    write_dataset(out, ByteTokenizer(), listed([("train", "z" * 15_000), ("val", "w")], "new"), shard_tokens=10_000)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "prepare.py", "train_000000.bin",
                                                     "train_000001.bin", "val_000000.bin"]
    assert load_meta(out)["source"] == "new" and tokens(out, "train")[:1] == [ord("z")]


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "error: --workers: must be >= 1, got 0"),
    (["--shard-tokens", "0"], "error: --shard-tokens: must be >= 1, got 0"),  # would loop forever
    (["--workers", "x"], "error: argument --workers: invalid int value: 'x'"),
], ids=["workers-0", "shard-tokens-0", "workers-not-int"])
def test_bad_option_is_one_line_naming_it(args, message, tmp_path):
    p = run_script("shakespeare", "--input", SHAKESPEARE, "--out", tmp_path / "out", *args, check=False)
    assert p.returncode == 2 and p.stderr == message + "\n", p.stderr
    assert not (tmp_path / "out").exists()


def test_no_network_is_one_line_pointing_at_input(tmp_path):
    p = run_script("openwebtext", "--out", tmp_path / "out", check=False)  # conftest sets HF_DATASETS_OFFLINE=1
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("error: no network: cannot download Skylion007/openwebtext")
    assert p.stderr.endswith("prepare from a local file with --input PATH\n")


def test_gpt2_bpe_files_unreachable_is_a_connection_error_saying_how_to_work_offline(monkeypatch):
    import requests
    from scaling.tokenizer import GPT2Tokenizer

    def unreachable(name):
        raise requests.exceptions.ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")
    monkeypatch.setattr(tiktoken, "get_encoding", unreachable)
    with pytest.raises(ConnectionError, match="no network: tiktoken cannot fetch GPT-2's BPE files.*TIKTOKEN_CACHE_DIR"):
        GPT2Tokenizer()


def test_shard_tokens_applies_to_every_dataset(tmp_path):
    run_script("shakespeare_char", "--input", SHAKESPEARE, "--out", tmp_path, "--shard-tokens", 400_000)
    assert load_meta(tmp_path)["splits"]["train"]["files"] == [f"train_{i:06d}.bin" for i in range(3)]


# The hub's parquet copy, as a local folder: cached and streamed reading, resuming, disk space.

def hub_documents():
    lines = documents(6000)
    return [" ".join(lines[(i * 7 + j) % len(lines)] for j in range(5)) for i in range(6000)]

@pytest.fixture(scope="module")
def owt_hub(tmp_path_factory):
    """A folder laid out as the hub's parquet conversion of OpenWebText: three files, 6000
    documents, ~1.4M tokens (a few seconds to prepare on one process: time to interrupt it)."""
    root = tmp_path_factory.mktemp("hub")
    docs = hub_documents()
    for k in range(3):
        hub_folder(root, f"plain_text/train/{k:04d}.parquet", docs[k * 2000:(k + 1) * 2000])
    return root / "repo"


@pytest.fixture(scope="module")
def owt_whole(owt_hub, tmp_path_factory):
    """owt_hub prepared in one go (cached), in 10,000-token shards."""
    out = tmp_path_factory.mktemp("whole") / "owt"
    run_script("openwebtext", "--input", owt_hub, "--out", out, "--shard-tokens", 10_000)
    return {f: b for f, (b, _) in snapshot(out).items()}


def test_a_hub_layout_folder_prepares_identically_cached_and_streamed(owt_hub, owt_whole, tmp_path):
    run_script("openwebtext", "--input", owt_hub, "--out", tmp_path / "streamed", "--shard-tokens", 10_000, "--streaming")
    assert len(owt_whole) > 100 and {f: b for f, (b, _) in snapshot(tmp_path / "streamed").items()} == owt_whole
    meta = load_meta(tmp_path / "streamed")
    assert meta["source"].endswith("3 parquet files, 6,000 documents") and meta["val_fraction"] == 0.0005
    assert sum(s["tokens"] for s in meta["splits"].values()) == expected_tokens(hub_documents())


def start_and_interrupt(args, staging, sig, delay, env=None):
    """Start a preparation and send it `sig` `delay` seconds after it finished its first shard."""
    # Ctrl-C as from a terminal: a job started in the background of a non-interactive shell (a CI
    # runner's, say) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
    p = subprocess.Popen([sys.executable, str(ROOT / "data" / "openwebtext" / "prepare.py"), *map(str, args)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (staging / "progress.json").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    return p.returncode, err


@pytest.mark.parametrize("mode, sig", [
    pytest.param("cached", signal.SIGKILL, id="cached-killed"),
    pytest.param("streaming", signal.SIGKILL, id="streaming-killed", marks=pytest.mark.slow),  # and from the hub below
    pytest.param("cached", signal.SIGINT, id="cached-ctrl-c", marks=pytest.mark.slow),
])
def test_an_interrupted_preparation_continues_to_byte_identical_shards(owt_hub, owt_whole, tmp_path, mode, sig):
    args = ["--input", owt_hub, "--shard-tokens", 10_000, "--workers", 1] + (["--streaming"] if mode == "streaming" else [])
    rc, err = start_and_interrupt(args + ["--out", tmp_path / "cut"], tmp_path / ".cut.partial", sig,
                                  random.uniform(0, 0.2))
    if sig == signal.SIGINT:  # Ctrl-C: one line saying where the work is kept
        assert rc == 130 and err.splitlines()[-1] == (f"interrupted; the shards done are kept in {tmp_path / '.cut.partial'}: "
                                                      "the same command continues"), err
    else:
        assert rc == -signal.SIGKILL
    assert not (tmp_path / "cut").exists()
    p = run_script("openwebtext", *args, "--out", tmp_path / "cut")
    assert "continuing the interrupted preparation" in p.stdout
    assert {f: b for f, (b, _) in snapshot(tmp_path / "cut").items()} == owt_whole
    assert not (tmp_path / ".cut.partial").exists()


def test_an_interrupted_preparation_is_continued_only_by_the_same_command(owt_hub, tmp_path):
    args = ["--input", owt_hub, "--workers", 1, "--out", tmp_path / "out"]
    start_and_interrupt(args + ["--shard-tokens", 10_000], tmp_path / ".out.partial", signal.SIGKILL, 0)
    kept = snapshot(tmp_path / ".out.partial")
    p = run_script("openwebtext", *args, "--shard-tokens", 20_000, check=False)
    assert p.returncode == 2 and p.stderr == (f"error: {tmp_path / '.out.partial'} holds an interrupted preparation of "
                                              "another input or with other settings: run that command again to finish "
                                              "it, or add --restart to discard it\n"), p.stderr
    assert snapshot(tmp_path / ".out.partial") == kept
    p = run_script("openwebtext", *args, "--shard-tokens", 20_000, "--restart")
    assert "continuing" not in p.stdout and load_meta(tmp_path / "out")["splits"]["train"]["files"][1] == "train_000001.bin"
    assert len(read_tokens(tmp_path / "out" / "train_000000.bin")) == 20_000


# One preparation per output folder at a time, and nothing temporary in a finished dataset.

def test_a_second_preparation_into_a_folder_being_prepared_exits_2_and_the_first_ends_intact(owt_hub, owt_whole,
                                                                                              tmp_path):
    args = ["--input", owt_hub, "--shard-tokens", 10_000, "--workers", 1, "--out", tmp_path / "out"]
    staging = tmp_path / ".out.partial"
    first = subprocess.Popen([sys.executable, str(ROOT / "data" / "openwebtext" / "prepare.py"), *map(str, args)],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (staging / "progress.json").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)  # paused half-way through its ~140 shards, for as long as the second runs
        kept = snapshot(staging)
        second = run_script("openwebtext", *args, check=False)
        assert snapshot(staging) == kept  # none of the first's files touched
    finally:
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=300)
    assert second.returncode == 2 and second.stderr == (
        f"error: {tmp_path / 'out'} is being prepared by another process (host {socket.gethostname()}, pid "
        f"{first.pid}); wait for it to finish, or prepare into another folder\n"), second.stderr
    assert first.returncode == 0, err
    assert {f: b for f, (b, _) in snapshot(tmp_path / "out").items()} == owt_whole
    assert not staging.exists()


HOLD_AND_PREPARE = """
import sys
from scaling.prepare import preparing, write_dataset
from scaling.sources import listed
from scaling.tokenizer import ByteTokenizer
with preparing(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()
    write_dataset(sys.argv[1], ByteTokenizer(), listed([("train", "some text"), ("val", "more")], "the holder's"))
"""

def first_line(p, timeout=120):
    """p's first line of output, or "" if none comes in time: a regression fails instead of hanging."""
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    return p.stdout.readline() if ready else ""


FIND_EMBEDDED = """
import sys, types
from scaling.data import load_meta
from scaling.prepare import dataset_dir
cfg = types.SimpleNamespace(data=types.SimpleNamespace(root=sys.argv[1], dataset="embedded"))
print(load_meta(dataset_dir(cfg))["source"])
"""


def test_a_run_that_finds_the_embedded_corpus_being_prepared_waits_and_uses_it(tmp_path):
    d = tmp_path / "embedded"
    py = [sys.executable, "-c"]
    holder = subprocess.Popen(py + [HOLD_AND_PREPARE, d], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    run = None
    try:
        assert first_line(holder) == "held\n"
        run = subprocess.Popen(py + [FIND_EMBEDDED, tmp_path], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        assert first_line(run) == (f"waiting for the preparation of {d} by another process (host "
                                   f"{socket.gethostname()}, pid {holder.pid}) ...\n")
        holder.communicate("go\n", timeout=120)
        out, err = run.communicate(timeout=120)
    finally:
        for p in (holder, run):
            if p and p.poll() is None:
                p.kill()
                p.wait()
    assert holder.returncode == 0 and run.returncode == 0, err
    assert out == "the holder's\n"  # the holder's dataset, not prepared a second time


def test_a_finished_dataset_holds_no_temporary_file(tmp_path):
    from scaling.prepare import write_dataset
    from scaling.tokenizer import ByteTokenizer
    out = tmp_path / "out"
    write_dataset(out, ByteTokenizer(), listed([("train", "old train"), ("val", "old val")], "old"))
    (out / "train_000002.bin.tmp").write_bytes(b"left in the dataset by an earlier version")

    def docs():
        for i in range(50):
            if i == 25:  # a temporary no writer of this preparation closes (a racing process left it)
                (tmp_path / ".out.partial" / "train_000009.bin.tmp").write_bytes(b"not ours")
            yield ("val" if i % 10 == 0 else "train"), "new document " * 100
    meta = write_dataset(out, ByteTokenizer(), listed(docs(), "new"), batch_chars=1000, shard_tokens=20_000)
    files = [f for s in meta["splits"].values() for f in s["files"]]
    assert len(files) > 2 and sorted(p.name for p in out.iterdir()) == sorted(files + ["meta.json"])
    assert not (tmp_path / ".out.partial").exists()


def test_a_failed_download_leaves_no_temporary_file_in_or_beside_the_dataset_folder(tmp_path, monkeypatch, capsys):
    import urllib.request
    from scaling.prepare import main

    def cut_off(url, filename):
        Path(filename).write_text("First Citizen:\nBefore we proceed")  # what came before the connection dropped
        raise ConnectionResetError("connection reset by peer")
    monkeypatch.setattr(urllib.request, "urlretrieve", cut_off)
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit) as e:
        main("shakespeare", ["--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "error: no network: cannot download" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]


ENCODER_CYCLES = """
import signal, sys
from scaling.prepare import Encoder
from scaling.tokenizer import GPT2Tokenizer
signal.signal(signal.SIGTERM, lambda *_: None)  # as scaling.distributed.StopSignal does: a SIGTERM is only noted
tok, text = GPT2Tokenizer(), open(sys.argv[1]).read()[:200_000]
for _ in range(4):
    with Encoder(tok, 3, True) as enc:
        workers = list(enc.pool._pool)
        enc.submit(["hello"]).get()
    print("ended", [p.exitcode for p in workers])
for _ in range(2):
    try:
        with Encoder(tok, 3, True) as enc:
            workers = list(enc.pool._pool)
            for _ in range(6):
                enc.submit([text])
            raise RuntimeError("a failure with batches in flight")
    except RuntimeError:
        print("stopped", [p.exitcode is not None for p in workers])
"""


@pytest.mark.slow
def test_the_tokenizer_pool_closes_even_when_its_workers_inherit_a_python_sigterm_handler():
    # In a process of its own, so that the handler does not stay in this one. A regression hangs:
    # the timeout makes it a failure, and the process group (the pool's workers too) is killed.
    p = subprocess.Popen([sys.executable, "-c", ENCODER_CYCLES, str(SHAKESPEARE)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail("the encoder's pool did not close")
    assert p.returncode == 0, err
    # Ended by the pool's own end-of-work message (exit code 0), not a signal; after an error, ended.
    assert out.splitlines() == ["ended [0, 0, 0]"] * 4 + ["stopped [True, True, True]"] * 2


def can_mount_tmpfs():
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                           "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True).returncode == 0


@pytest.mark.skipif(not shutil.which("unshare") or not can_mount_tmpfs(), reason="needs unshare and tmpfs mounts")
def test_a_preparation_that_will_not_fit_is_refused_before_the_first_token(owt_hub, tmp_path):
    # --out on a 256 KB tmpfs, in a mount namespace of its own: ~1.4M tokens need ~2.8 MB.
    (tmp_path / "small").mkdir()
    script = (f"mount -t tmpfs -o size=256k tmpfs {tmp_path / 'small'} && exec {sys.executable} "
              f"{ROOT / 'data/openwebtext/prepare.py'} --input {owt_hub} --out {tmp_path / 'small/out'} --streaming; ")
    p = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("error: not enough disk space: the token files ~") and "which has 0.3 MB free" in p.stderr


def test_the_hub_layout_rules_find_a_whole_copy_or_say_why_not():
    from scaling.sources import parquet_layout
    assert parquet_layout(["README.md", "plain_text/train/0001.parquet", "plain_text/train/0000.parquet"], "r") == [
        "plain_text/train/0000.parquet", "plain_text/train/0001.parquet"]
    with pytest.raises(ValueError, match=r"^r@main: only a dataset script \(openwebtext.py\)"):
        parquet_layout(["README.md", "openwebtext.py", "subsets/urlsf_subset00.tar"], "r@main")
    with pytest.raises(ValueError, match=r"^r: a partial parquet conversion \(plain_text/partial-train/\)"):
        parquet_layout(["plain_text/partial-train/0000.parquet"], "r")


def test_a_hub_dataset_smaller_than_a_complete_copy_ends_with_a_warning_naming_the_shortfall(tmp_path, capsys):
    from scaling.prepare import check_complete
    meta = {"source": "hub", "splits": {"train": {"documents": 7_000_000, "tokens": 8_000_000_000},
                                        "val": {"documents": 13_769, "tokens": 4_000_000}}}
    check_complete(tmp_path, meta, {"documents": 8_013_769, "tokens": 9_040_017_095})
    err = capsys.readouterr().err
    assert err == (f"warning: {tmp_path} is incomplete: 1,000,000 documents fewer than the 8,013,769 of a complete copy; "
                   "8,004,000,000 tokens, 11.5% short of about 9,040,017,095 (source: hub)\n")
    check_complete(tmp_path, {**meta, "splits": {"train": {"documents": 8_013_769, "tokens": 9_040_017_095}}},
                   {"documents": 8_013_769, "tokens": 9_040_017_095})
    assert capsys.readouterr().err == ""


# The hub itself, on loopback (tests/loopback_hub.py): what huggingface_hub and datasets do there.

def hub_env(hub, tmp_path):
    return {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
            "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}


def owt_repo(root, convert_folder):
    """Skylion007/openwebtext as the hub holds it today: the loading script on main, the parquet
    conversion (hub_documents in three files) on refs/convert/parquet."""
    repo = root / "Skylion007" / "openwebtext"
    (repo / "main").mkdir(parents=True)
    (repo / "main" / "openwebtext.py").write_text("# the loading script datasets 4+ refuses\n")
    docs = hub_documents()
    for k in range(3):
        f = repo / "refs%2Fconvert%2Fparquet" / "plain_text" / convert_folder / f"{k:04d}.parquet"
        f.parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict({"text": docs[k * 2000:(k + 1) * 2000]}).to_parquet(f)


def cache_needs(env):
    """What reading the hub's OpenWebText (cached) would add to the Hugging Face caches of env."""
    code = ("import json; from scaling.sources import hub_parquet, hf_cache_needs; r = 'Skylion007/openwebtext'; "
            "pf = hub_parquet(r, [('refs/convert/parquet', 'plain_text')], 'text'); "
            "print(json.dumps(hf_cache_needs(pf, 'text', r, 'refs/convert/parquet')))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_openwebtext_comes_from_the_hubs_parquet_conversion_cached_or_streamed_and_resumed(owt_whole, tmp_path):
    from loopback_hub import LoopbackHub
    owt_repo(tmp_path / "hub", "train")
    args = ["--shard-tokens", 10_000, "--workers", 1]
    with LoopbackHub(tmp_path / "hub") as hub:
        env = hub_env(hub, tmp_path / "a")
        p = subprocess.run([sys.executable, "data/openwebtext/prepare.py", "--out", tmp_path / "cached", *map(str, args)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        assert {f: b for f, (b, _) in snapshot(tmp_path / "cached").items() if f.name != "meta.json"} == {
            f: b for f, b in owt_whole.items() if f.name != "meta.json"}
        assert load_meta(tmp_path / "cached")["source"] == ("Skylion007/openwebtext@refs/convert/parquet: "
                                                            "3 parquet files, 6,000 documents")
        assert "holds 6,000 documents, a complete copy 8,013,769" in p.stderr  # before the work
        assert "is incomplete: 8,007,769 documents fewer than the 8,013,769 of a complete copy" in p.stderr  # after
        assert len(list((tmp_path / "a" / "hf" / "hub").rglob("*.parquet"))) == 3  # cached: downloaded first
        needs = cache_needs(env), cache_needs(hub_env(hub, tmp_path / "empty"))  # what the space check counts
        files = sorted((tmp_path / "hub").rglob("*.parquet"))
        assert needs[0] == {env["HF_HUB_CACHE"]: 0}  # all downloaded, and the Arrow copy made
        assert needs[1] == {str(tmp_path / "empty" / "hf" / "hub"): sum(f.stat().st_size for f in files),
                            str(tmp_path / "empty" / "hf" / "datasets"): parquet_footers(list(map(str, files)), "text")[1]}

        env = hub_env(hub, tmp_path / "b")
        cmd = [*args, "--streaming", "--out", tmp_path / "streamed"]
        rc, err = start_and_interrupt(cmd, tmp_path / ".streamed.partial", signal.SIGKILL, 0.1, env=env)
        assert rc == -signal.SIGKILL, err
        p = subprocess.run([sys.executable, "data/openwebtext/prepare.py", *map(str, cmd)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0 and "continuing the interrupted preparation" in p.stdout, p.stderr
    assert snapshot(tmp_path / "streamed").keys() == snapshot(tmp_path / "cached").keys()
    assert {f: b for f, (b, _) in snapshot(tmp_path / "streamed").items()} == {
        f: b for f, (b, _) in snapshot(tmp_path / "cached").items()}
    assert not (tmp_path / "b" / "hf" / "hub").exists()  # streamed: nothing in the hub cache


def test_openwebtext_with_only_a_script_and_a_partial_conversion_on_the_hub_is_one_line_with_the_alternative(tmp_path):
    from loopback_hub import LoopbackHub
    owt_repo(tmp_path / "hub", "partial-train")
    with LoopbackHub(tmp_path / "hub") as hub:
        p = subprocess.run([sys.executable, "data/openwebtext/prepare.py", "--out", str(tmp_path / "out")],
                           cwd=ROOT, env=hub_env(hub, tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(
        "error: no complete parquet copy of Skylion007/openwebtext on the hub: Skylion007/openwebtext@main: only a "
        "dataset script (openwebtext.py), which datasets 4 and later no longer run (\"Dataset scripts are no longer "
        "supported\"); Skylion007/openwebtext@refs/convert/parquet: a partial parquet conversion "
        "(plain_text/partial-train/), not the whole dataset. Instead: python -m venv owt-env && ")
    assert p.stderr.endswith("&& python data/openwebtext/prepare.py --input owt.parquet\n")
    assert not (tmp_path / "out").exists()


def test_fineweb_edu_reads_the_text_column_of_sample_10bt_on_the_hub(tmp_path):
    from loopback_hub import LoopbackHub
    folder = tmp_path / "hub" / "HuggingFaceFW" / "fineweb-edu" / "main" / "sample" / "10BT"
    folder.mkdir(parents=True)
    docs = documents(400)
    for k in range(2):  # FineWeb-Edu's columns, text among them
        part = docs[k * 200:(k + 1) * 200]
        datasets.Dataset.from_dict({"text": part, "id": [f"<urn:{i}>" for i in range(200)], "score": [3.1] * 200,
                                    "url": ["https://example.com"] * 200}).to_parquet(folder / f"00{k}_00000.parquet")
    with LoopbackHub(tmp_path / "hub") as hub:
        p = subprocess.run([sys.executable, "data/fineweb_edu/prepare.py", "--out", str(tmp_path / "out"), "--streaming"],
                           cwd=ROOT, env=hub_env(hub, tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    meta = load_meta(tmp_path / "out")
    assert meta["source"] == "HuggingFaceFW/fineweb-edu@main: 2 parquet files, 400 documents"
    assert sum(s["tokens"] for s in meta["splits"].values()) == expected_tokens(docs)
    assert "warning: " in p.stderr and "short of about 10,000,000,000" in p.stderr

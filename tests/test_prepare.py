"""data/<name>/prepare.py, offline on local inputs: token counts, splits, shards, errors."""

import json
import subprocess
import sys

import datasets
import pytest
import tiktoken

from conftest import ROOT, SHAKESPEARE
from scaling.data import TokenWindows, load_meta, read_tokens


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
    assert s["val"]["documents"] == 2  # nanoGPT's 0.0005 of 4000
    assert s["train"]["documents"] + s["val"]["documents"] == 4000
    assert s["train"]["tokens"] + s["val"]["tokens"] == expected_tokens(docs)
    ids = tokens(tmp_path / "out", "val")
    assert ids.count(50256) == 2 and ids[-1] == 50256


def test_files_do_not_depend_on_workers_or_batch_size(tmp_path):
    # Small batches keep many in flight on 3 processes: results must still be written in input order.
    from scaling.prepare import write_dataset
    from scaling.tokenizer import GPT2Tokenizer
    docs = [("val" if i % 7 == 0 else "train", t) for i, t in enumerate(documents(300))]
    for name, workers, batch_chars in (("one", 1, 1 << 20), ("many", 3, 2_000)):
        write_dataset(tmp_path / name, GPT2Tokenizer(), docs, source="test", workers=workers,
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


@pytest.mark.parametrize("make_input, message", [
    (lambda d: d / "missing.jsonl", "input not found"),
    (write("x.csv", "a,b"), "unsupported input"),
    (write("x.jsonl", '{"body": "hi"}\n{"body": "yo"}\n'), "no 'text' column"),
    (lambda d: (d / "x.jsonl").touch() or d / "x.jsonl", "x.jsonl: empty file"),
    (write("x.jsonl", '{"text": "a"}\n{bad\n'), "x.jsonl: cannot read it (JSON parse error"),
    (write("x.jsonl", '{"text": null}\n{"text": "a"}\n{"text": "b"}\n'), "'text' value in the"),
    (write("x.jsonl", '{"text": ""}\n{"text": ""}\n'), "no text for the train split"),
], ids=["missing", "csv", "no-text-column", "empty", "malformed", "null-text", "only-empty-texts"])
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
    assert sorted(x.name for x in tmp_path.iterdir()) == ["empty.txt", "out"]  # no staging folder left


def test_the_new_dataset_is_written_beside_out_and_moved_in_only_when_complete(tmp_path):
    from scaling.prepare import write_dataset
    from scaling.tokenizer import ByteTokenizer
    out = tmp_path / "out"
    write_dataset(out, ByteTokenizer(), [("train", "old train"), ("val", "old val")], source="old")
    before = snapshot(out)
    seen = {}

    def docs():  # a preparation that is killed after writing part of its files
        for i in range(50):
            yield ("val" if i % 10 == 0 else "train"), "new document " * 100
        seen["out"], seen["staging"] = snapshot(out), snapshot(tmp_path / ".out.partial")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        write_dataset(out, ByteTokenizer(), docs(), source="new", batch_chars=1000, shard_tokens=20_000)
    assert seen["out"] == before and len(seen["staging"]) >= 3  # new shards were being written beside
    assert snapshot(out) == before and not (tmp_path / ".out.partial").exists()


def test_a_new_dataset_replaces_the_old_files_and_keeps_the_others(tmp_path):
    from scaling.prepare import write_dataset
    from scaling.tokenizer import ByteTokenizer
    out = tmp_path / "out"
    write_dataset(out, ByteTokenizer(), [("train", "x" * 50_000), ("val", "y")], source="old", shard_tokens=10_000)
    (out / "prepare.py").write_text("# the script lives in data/<name>/ too\n")
    write_dataset(out, ByteTokenizer(), [("train", "z" * 15_000), ("val", "w")], source="new", shard_tokens=10_000)
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

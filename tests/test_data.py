"""Token files: format checks, windows, meta.json, and broken datasets meeting the trainer."""

import json
import re
import shutil

import numpy as np
import pytest

from scaling.data import HEADER_BYTES, DataError, TokenWindows, load_meta, read_tokens, write_tokens
from scaling.loader import DataLoader
from scaling.prepare import SplitWriter, prepare_embedded, write_meta
from scaling.tokenizer import ByteTokenizer


def make_dataset(path, n_tokens=10_000, shard_tokens=3_000):
    path.mkdir(parents=True, exist_ok=True)
    tok = ByteTokenizer()
    splits = {}
    for split in ("train", "val"):
        w = SplitWriter(path, split, tok.vocab_size, shard_tokens=shard_tokens)
        w.write(list(np.arange(n_tokens) % 256))
        splits[split] = w.close()
    write_meta(path, tok, splits, source="test")
    return path


def test_token_file_round_trips_and_picks_uint16_or_uint32(tmp_path):
    write_tokens(tmp_path / "a.bin", [1, 2, 65535], vocab_size=65536)
    write_tokens(tmp_path / "b.bin", [1, 2, 70000], vocab_size=100_000)
    a, b = read_tokens(tmp_path / "a.bin"), read_tokens(tmp_path / "b.bin")
    assert a.dtype == np.uint16 and list(a) == [1, 2, 65535]
    assert b.dtype == np.uint32 and list(b) == [1, 2, 70000]


def test_truncated_token_file_is_refused(tmp_path):
    f = tmp_path / "t.bin"
    write_tokens(f, list(range(100)), vocab_size=257)
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_tokens(f)


def test_foreign_file_is_refused(tmp_path):
    f = tmp_path / "train.bin"
    np.arange(1000, dtype=np.uint16).tofile(f)  # nanoGPT's headerless format
    with pytest.raises(DataError, match="not a token file"):
        read_tokens(f)


def test_split_writer_starts_new_files_at_the_shard_size(tmp_path):
    make_dataset(tmp_path / "d", n_tokens=10_000, shard_tokens=3_000)
    files = sorted(p.name for p in (tmp_path / "d").glob("train_*.bin"))
    assert files == [f"train_{i:06d}.bin" for i in range(4)]
    sizes = [len(read_tokens(tmp_path / "d" / f)) for f in files]
    assert sizes == [3000, 3000, 3000, 1000]
    assert (tmp_path / "d" / files[0]).stat().st_size == HEADER_BYTES + 3000 * 2


def test_windows_hold_inputs_and_shifted_targets_within_one_file(tmp_path):
    windows = TokenWindows(make_dataset(tmp_path / "d"), "train", seq_len=100)
    assert windows.num_windows == 3 * 29 + 9  # (3000-1)//100 per full file, (1000-1)//100 last
    w = windows.window(29)  # first window of the second file
    assert len(w) == 101 and w[0] == 3000 % 256


def test_embedded_corpus_is_python_source_as_bytes(tmp_path):
    meta = prepare_embedded(tmp_path / "embedded")
    assert meta["tokenizer"] == "byte" and meta["vocab_size"] == 257
    assert meta["splits"]["train"]["tokens"] > 1_000_000 and meta["splits"]["val"]["tokens"] > 10_000
    text = ByteTokenizer().decode(read_tokens(tmp_path / "embedded" / meta["splits"]["train"]["files"][0])[:20_000])
    assert "def " in text and "import " in text


@pytest.mark.parametrize("override, message", [
    ("--data.tokenizer=gpt2", "data.tokenizer: recipe expects 'gpt2' but dataset 'shakes' was prepared with 'byte'"),
    ("--model.vocab_size=100", "model.vocab_size: 100 is smaller than the dataset's vocabulary (byte, 257 tokens)"),
])
def test_tokenizer_or_vocab_disagreeing_with_the_dataset_is_a_one_line_error(override, message, data_root, tmp_path):
    from conftest import run_module, tiny_args
    p = run_module("scaling.train", *tiny_args(data_root, tmp_path, override))
    assert p.returncode == 2 and p.stderr.strip() == f"error: {message}", p.stderr


# A broken dataset folder is a DataError naming the file (and train turns it into one line, exit 2).

def test_meta_json_that_is_not_json_is_refused_naming_it(tmp_path):
    d = make_dataset(tmp_path / "d")
    (d / "meta.json").write_text('{"format": 1,')
    with pytest.raises(DataError, match=r"meta\.json: not valid JSON"):
        load_meta(d)


def test_meta_json_without_a_required_key_names_the_key(tmp_path):
    d = make_dataset(tmp_path / "d")
    meta = load_meta(d)
    del meta["vocab_size"]
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"meta\.json: missing key 'vocab_size'"):
        load_meta(d)


# meta.json must agree with itself and with its token files' headers.
ALPHABET_70K = "".join(chr(0x10000 + i) for i in range(70_000))  # more ids than 2 bytes per token hold


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(tokenizer="char", chars="abc", vocab_size=4, eot=None),
     r"'chars' holds 3 characters \(3 distinct\), but 'vocab_size' is 4"),
    (lambda m: m.update(tokenizer="char", chars="abca", vocab_size=4, eot=None),
     r"'chars' holds 4 characters \(3 distinct\), but 'vocab_size' is 4"),
    (lambda m: m.update(eot=257), r"'eot' should be a token id below 'vocab_size' 257, got 257"),
    (lambda m: m.update(vocab_size=0), r"'vocab_size' should be >= 1, got 0"),
    (lambda m: m.update(vocab_size=True), r"'vocab_size' should be an integer, got True"),
    (lambda m: m.update(vocab_size=300), r"'vocab_size' is 300, but the byte tokenizer has 257 tokens"),
    (lambda m: m.update(tokenizer="char", chars=ALPHABET_70K, vocab_size=70_000, eot=None),
     r"train_000000\.bin: 2 bytes per token cannot hold the ids of 'vocab_size' 70000"),
    (lambda m: m["splits"]["val"].update(tokens=m["splits"]["val"]["tokens"] + 1),
     r"'splits\.val\.tokens' is 10001, but its token files hold 10000"),
], ids=["short-alphabet", "repeated-char", "eot", "zero-vocab", "bool-vocab", "vocab-not-the-tokenizers",
        "dtype-too-small", "token-count"])
def test_meta_json_that_disagrees_with_itself_or_its_files_is_refused_naming_the_field(change, message, tmp_path):
    d = make_dataset(tmp_path / "d")
    edit_meta(change)(d)
    with pytest.raises(DataError, match=message):
        load_meta(d)


def test_token_file_listed_but_missing_is_refused_naming_it(tmp_path):
    d = make_dataset(tmp_path / "d")
    (d / "val_000001.bin").unlink()
    with pytest.raises(DataError, match=r"val_000001\.bin: cannot read the token file \(No such file"):
        TokenWindows(d, "val", seq_len=100)


def with_id_beyond_the_vocabulary(d):
    """train_000001.bin rewritten with one id (300) >= the byte vocabulary (257) at its token 150."""
    ids = np.arange(3000) % 256
    ids[150] = 300
    write_tokens(d / "train_000001.bin", ids, vocab_size=257)
    return d


def test_loader_refuses_a_token_id_beyond_the_vocabulary_naming_file_and_split(tmp_path):
    windows = TokenWindows(with_id_beyond_the_vocabulary(make_dataset(tmp_path / "d")), "train", seq_len=100)
    ld = DataLoader(windows, micro_batch=4, global_batch=8, seed=0)
    with pytest.raises(DataError, match=r"train_000001\.bin: token id 300 in the 'train' split is >= vocab_size 257"):
        for _ in range(windows.num_windows // 8 + 1):  # one epoch reaches every window
            ld.next_step()


def test_reading_a_window_refuses_a_token_id_beyond_the_vocabulary(tmp_path):
    # Evaluation (eval.mean_loss, for training and `scaling.eval loss`) reads windows one by one, not through the loader.
    windows = TokenWindows(with_id_beyond_the_vocabulary(make_dataset(tmp_path / "d")), "train", seq_len=100)
    windows.window(28)  # the last window of the first file is fine
    with pytest.raises(DataError, match=r"train_000001\.bin: token id 300"):
        windows.window(30)  # tokens 100..200 of the second file


def edit_meta(change):
    def f(d):
        meta = json.loads((d / "meta.json").read_text())
        change(meta)
        (d / "meta.json").write_text(json.dumps(meta))
    return f


def break_meta(key):
    return edit_meta(lambda meta: meta.pop(key))


@pytest.mark.parametrize("breaks, message", [
    (lambda d: (d / "meta.json").write_text("{not json"), r"shakes/meta\.json: not valid JSON"),
    (break_meta("splits"), r"shakes/meta\.json: missing key 'splits'"),
    (lambda d: (d / "val_000000.bin").unlink(), r"shakes/val_000000\.bin: cannot read the token file"),
    (lambda d: write_tokens(d / "train_000000.bin", np.full(len(read_tokens(d / "train_000000.bin")), 1000),
                            vocab_size=257),  # as many tokens as before: meta.json's count still holds
     r"shakes/train_000000\.bin: token id 1000 in the 'train' split is >= vocab_size 257"),
    (edit_meta(lambda m: m.update(tokenizer="char", chars="abc", eot=None)),
     r"shakes/meta\.json: 'chars' holds 3 characters \(3 distinct\), but 'vocab_size' is 257"),
], ids=["not-json", "missing-key", "missing-file", "id-beyond-vocab", "short-alphabet"])
def test_train_on_a_broken_dataset_exits_2_with_one_line_naming_the_file(breaks, message, data_root, tmp_path):
    from conftest import run_module, tiny_args
    root = tmp_path / "data"
    shutil.copytree(data_root / "shakes", root / "shakes")
    breaks(root / "shakes")
    p = run_module("scaling.train", *tiny_args(root, tmp_path / "run"))
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and re.match("error: .*" + message, p.stderr), p.stderr

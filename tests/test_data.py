"""Token files and the loader: format checks, sampling order, data-parallel slicing."""

import numpy as np
import pytest

from scaling.data import HEADER_BYTES, DataError, DataLoader, TokenWindows, read_tokens, write_tokens
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


def test_loader_order_is_fixed_by_seed_and_covers_each_window_once_per_epoch(tmp_path):
    windows = TokenWindows(make_dataset(tmp_path / "d"), "train", seq_len=100)
    a = DataLoader(windows, micro_batch=4, global_batch=8, seed=1)
    b = DataLoader(windows, micro_batch=4, global_batch=8, seed=1)
    idx = [a._window_index(i) for i in range(windows.num_windows)]
    assert sorted(idx) == list(range(windows.num_windows))
    assert all(np.array_equal(x1, x2) for (x1, _), (x2, _) in zip(a.next_step(), b.next_step()))
    c = DataLoader(windows, micro_batch=4, global_batch=8, seed=2)
    assert idx != [c._window_index(i) for i in range(windows.num_windows)]


def test_data_parallel_ranks_split_each_global_batch_without_overlap(tmp_path):
    windows = TokenWindows(make_dataset(tmp_path / "d"), "train", seq_len=100)
    single = DataLoader(windows, micro_batch=2, global_batch=8, seed=3)
    ranks = [DataLoader(windows, micro_batch=2, global_batch=8, dp_rank=r, dp_size=2, seed=3) for r in (0, 1)]
    for _ in range(3):
        whole = np.concatenate([x.numpy() for x, _ in single.next_step()])
        parts = np.concatenate([x.numpy() for r in ranks for x, _ in r.next_step()])
        assert np.array_equal(whole, parts)


def test_loader_state_is_its_global_position(tmp_path):
    windows = TokenWindows(make_dataset(tmp_path / "d"), "train", seq_len=100)
    a = DataLoader(windows, micro_batch=4, global_batch=8, seed=1)
    a.next_step()
    b = DataLoader(windows, micro_batch=4, global_batch=8, seed=1)
    b.load_state_dict(a.state_dict())
    assert b.state_dict()["position"] == 8
    assert all(np.array_equal(x1, x2) for (x1, _), (x2, _) in zip(a.next_step(), b.next_step()))


def test_embedded_corpus_is_python_source_as_bytes(tmp_path):
    meta = prepare_embedded(tmp_path / "embedded")
    assert meta["tokenizer"] == "byte" and meta["vocab_size"] == 257
    assert meta["splits"]["train"]["tokens"] > 1_000_000 and meta["splits"]["val"]["tokens"] > 10_000
    text = ByteTokenizer().decode(read_tokens(tmp_path / "embedded" / meta["splits"]["train"]["files"][0])[:20_000])
    assert "def " in text and "import " in text


def global_order(loaders, steps):
    """Each step's samples of all ranks together, in rank order."""
    out = []
    for _ in range(steps):
        out.append(np.concatenate([x.numpy() for ld in loaders for x, _ in ld.next_step()]))
    return out


@pytest.mark.parametrize("before, after", [(1, 1), (2, 2), (2, 1), (2, 4)])
def test_resumed_loader_continues_the_global_order_exactly(before, after, tmp_path):
    """Resume after 5 steps (crossing an epoch boundary later) on as many or another number of
    data-parallel ranks: the next batches equal those of the uninterrupted single-rank run."""
    windows = TokenWindows(make_dataset(tmp_path / "d"), "train", seq_len=100)
    epoch_steps = windows.num_windows // 8
    whole = global_order([DataLoader(windows, 2, 8, seed=5)], 5 + 2 * epoch_steps)
    first = [DataLoader(windows, 2, 8, dp_rank=r, dp_size=before, seed=5) for r in range(before)]
    assert all(np.array_equal(a, b) for a, b in zip(global_order(first, 5), whole[:5]))
    state = first[0].state_dict()
    resumed = [DataLoader(windows, 2, 8, dp_rank=r, dp_size=after, seed=5) for r in range(after)]
    for ld in resumed:
        ld.load_state_dict(state)
    rest = global_order(resumed, 2 * epoch_steps)
    assert all(np.array_equal(a, b) for a, b in zip(rest, whole[5:]))


@pytest.mark.parametrize("override, message", [
    ("--data.tokenizer=gpt2", "data.tokenizer: recipe expects 'gpt2' but dataset 'shakes' was prepared with 'byte'"),
    ("--model.vocab_size=100", "model.vocab_size: 100 is smaller than the dataset's vocabulary (byte, 257 tokens)"),
])
def test_tokenizer_or_vocab_disagreeing_with_the_dataset_is_a_one_line_error(override, message, data_root, tmp_path):
    from conftest import run_module, tiny_args
    p = run_module("scaling.train", *tiny_args(data_root, tmp_path, override))
    assert p.returncode == 2 and p.stderr.strip() == f"error: {message}", p.stderr

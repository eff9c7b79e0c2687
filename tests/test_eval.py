"""Evaluation and plots: split loss, HellaSwag scoring on a local file, the curves figure, and
which checkpoint of a run folder eval (and sample, convert) reads."""

import json
import math
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, SHAKESPEARE, read_metrics, run_module, tiny_args


@pytest.fixture(scope="module")
def shakespeare_model(data_root, tmp_path_factory):
    """A byte-level model trained for a few seconds on Shakespeare: enough to prefer English
    over noise, which is all the scoring test needs."""
    run_dir = tmp_path_factory.mktemp("run")
    run_module("scaling.train", *tiny_args(data_root, run_dir, "--train.max_steps=150", "--optim.lr=3e-3",
                                           "--train.eval_every=150", "--logging.every=50"), check=True)
    return run_dir


def test_split_loss_of_a_run_matches_its_own_validation(shakespeare_model, data_root):
    p = run_module("scaling.eval", shakespeare_model, "loss", "--data", data_root / "shakes",
                   "--seq-len", 64, "--sequences", 8, check=True)
    r = json.loads(p.stdout)
    val = [json.loads(x) for x in (shakespeare_model / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    # tiny.yaml evaluates the same first 8 windows of 64 tokens
    assert r["tokens"] == 8 * 64 and r["loss"] == pytest.approx(val[-1]["val_loss"], rel=1e-4)


def test_split_loss_uses_the_models_block_size_by_default_and_says_so(shakespeare_model, data_root):
    p = run_module("scaling.eval", shakespeare_model, "loss", "--data", data_root / "shakes", "--sequences", 2,
                   check=True)
    r = json.loads(p.stdout)
    assert r["seq_len"] == 64 and r["tokens"] == 2 * 64  # tiny.yaml: block_size 64


def test_split_loss_refuses_a_seq_len_longer_than_the_models_block_size(shakespeare_model, data_root):
    p = run_module("scaling.eval", shakespeare_model, "loss", "--data", data_root / "shakes", "--seq-len", 128)
    assert p.returncode == 2 and p.stderr == "error: --seq-len: 128 exceeds the model's block_size 64\n", p.stderr


def token_data(path, name, vocab_size, ids, **meta):
    """A prepared dataset whose meta.json names tokenizer name with vocab_size (and meta), holding ids."""
    from types import SimpleNamespace
    from scaling.prepare import SplitWriter, write_meta
    path.mkdir()
    w = SplitWriter(path, "val", vocab_size)
    w.write(np.asarray(ids, dtype=np.uint32))
    write_meta(path, SimpleNamespace(name=name, vocab_size=vocab_size, eot=vocab_size - 1), {"val": w.close()},
               source="test", **meta)
    return path


@pytest.mark.parametrize("weights", ["run", "pt"])
def test_split_loss_refuses_data_of_another_tokenizer(weights, shakespeare_model, tmp_path):
    # A byte-level model (a run, or our .pt converted from it) on GPT-2 BPE tokens: ids up to 50256.
    data = token_data(tmp_path / "bpe", "gpt2", 50257, np.arange(0, 50257, 97))
    model = shakespeare_model
    if weights == "pt":
        model = tmp_path / "model.pt"
        run_module("scaling.convert", shakespeare_model, model, check=True)
    p = run_module("scaling.eval", model, "loss", "--data", data, "--sequences", 2)
    assert p.returncode == 2 and p.stderr == (f"error: --data {data} holds 'gpt2' tokens (vocab_size 50257, its "
                                              "meta.json); the model was trained on 'byte' tokens (vocab_size 257, "
                                              "its tokenizer.json)\n"), p.stderr


def test_split_loss_refuses_a_char_dataset_of_another_alphabet(tmp_path):
    # The same tokenizer name, another alphabet: the ids mean other characters, and 'd' (id 3) is
    # past the model's 3-row embedding.
    from scaling.model import GPT, GPTConfig
    from scaling.weights import write_weights
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=3))
    write_weights(model.state_dict(), model.cfg, tmp_path / "abc.pt", "pt",
                  tokenizer={"name": "char", "vocab_size": 3, "eot": None, "chars": "abc"})
    data = token_data(tmp_path / "abcd", "char", 4, np.arange(4).repeat(20), chars="abcd")
    p = run_module("scaling.eval", tmp_path / "abc.pt", "loss", "--data", data, "--sequences", 2)
    assert p.returncode == 2 and p.stderr == (f"error: --data {data} holds 'char' tokens (vocab_size 4, its "
                                              "meta.json); the model was trained on 'char' tokens with another "
                                              "alphabet (vocab_size 3, its tokenizer.json)\n"), p.stderr


def test_split_loss_of_weights_without_a_tokenizer_refuses_ids_past_their_vocabulary(shakespeare_model, tmp_path):
    # A Hugging Face export of the byte model keeps no tokenizer: only the range can be checked.
    run_module("scaling.convert", shakespeare_model, tmp_path / "hf", "--to", "hf", check=True)
    data = token_data(tmp_path / "bpe", "gpt2", 50257, np.arange(0, 50257, 97))
    p = run_module("scaling.eval", tmp_path / "hf", "loss", "--data", data, "--sequences", 2)
    assert p.returncode == 2 and p.stderr == (f"error: --data {data} holds 'gpt2' tokens (vocab_size 50257, its "
                                              "meta.json), ids the model's 257-token vocabulary does not have\n"), p.stderr


def hellaswag_file(path):
    """Four examples in HellaSwag's real format. In each, one ending is Shakespeare's own next
    line and three are noise of its length; the labels mark Shakespeare's line in examples 0, 1 and 3 but a
    noise ending in example 2. A model that prefers English gets 3 of 4: accuracy 0.75."""
    lines = [x for x in SHAKESPEARE.read_text().splitlines() if len(x) > 30][100:108]
    rows = []
    for i in range(4):
        ctx, real = lines[2 * i], lines[2 * i + 1]
        # Noise as long as the real line, so that the summed loss (acc) and the per-character loss
        # (acc_norm) agree for a model that prefers English: a short noise ending could win on
        # the sum alone.
        rng = random.Random(i)
        endings = ["".join(rng.choice("qxzjvk ") for _ in real) for _ in range(3)]
        endings.insert(i % 4, real)  # the real ending at position i
        label = i if i != 2 else (i + 1) % 4
        rows.append({"ind": i, "activity_label": "Shakespeare", "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
                     "split": "val", "split_type": "indomain", "label": label, "endings": endings,
                     "source_id": f"test~{i}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_hellaswag_scores_by_completion_loss(shakespeare_model, tmp_path):
    p = run_module("scaling.eval", shakespeare_model, "hellaswag", "--file", hellaswag_file(tmp_path / "hs.jsonl"),
                   check=True)
    r = json.loads(p.stdout)
    assert r["examples"] == 4 and r["acc"] == 0.75 and r["acc_norm"] == 0.75


def test_hellaswag_of_weights_without_a_tokenizer_refuses_a_model_smaller_than_gpt2s_vocabulary(
        shakespeare_model, tmp_path):
    # Such weights are scored with GPT-2's tokenizer; the byte model's 257 rows cannot take its ids.
    run_module("scaling.convert", shakespeare_model, tmp_path / "hf", "--to", "hf", check=True)
    p = run_module("scaling.eval", tmp_path / "hf", "hellaswag", "--file", hellaswag_file(tmp_path / "hs.jsonl"))
    assert p.returncode == 2 and p.stderr == ("error: the model has 257 token ids, fewer than GPT-2's tokenizer "
                                              "(50257), which weights without a tokenizer.json are scored with\n"), p.stderr


def test_hellaswag_offline_is_one_line_pointing_at_a_local_file(tmp_path, monkeypatch, capsys):
    import scaling.eval
    monkeypatch.setattr(scaling.eval, "HELLASWAG_URL", "http://127.0.0.1:9/hellaswag_val.jsonl")  # refused
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as e:
        scaling.eval.main([str(tmp_path / "model"), "hellaswag"])  # the examples are read before the model
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: no network: cannot download HellaSwag's validation set from http://127.0.0.1:9/")
    assert err.endswith("fetch that file elsewhere and pass --file PATH\n")
    assert list((tmp_path / "cache" / "scaling").iterdir()) == []  # no partial download left to look complete


@pytest.mark.parametrize("content, message", [
    (None, "--file: {f} not found"),
    ('{"ctx": "a", "endings": ["b"], "label": 0}\nnot json\n', "{f}: line 2 is not JSON"),
    ('{"text": "a"}\n', "{f}: line 1 lacks ctx, endings and label"),
], ids=["missing", "not-json", "not-hellaswag"])
def test_a_bad_hellaswag_file_is_one_line_naming_it(content, message, tmp_path):
    f = tmp_path / "hs.jsonl"
    if content is not None:
        f.write_text(content)
    p = run_module("scaling.eval", tmp_path / "model", "hellaswag", "--file", f)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: " + message.format(f=f)), p.stderr


@pytest.mark.parametrize("opt", ["--seq-len", "--sequences", "--batch", "--limit"])
def test_a_count_below_one_is_one_line_naming_it(opt, tmp_path, capsys):
    from scaling.eval import main
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "model"), "loss", "--data", str(tmp_path), opt, "0"])
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {opt}: must be >= 1, got 0\n"


def test_eval_of_missing_weights_is_a_one_line_error(tmp_path):
    p = run_module("scaling.eval", tmp_path / "nothing", "loss", "--data", tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1


def count_colour(img, hex_colour, tol=0.02):
    rgb = np.array([int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(img[..., :3] - rgb).max(-1) < tol).sum())


def test_plot_draws_every_run_into_a_png(shakespeare_model, data_root, tmp_path):
    other = tmp_path / "other"
    run_module("scaling.train", *tiny_args(data_root, other, "--train.max_steps=20", "--logging.every=2"), check=True)
    out = tmp_path / "curves.png"
    p = run_module("scaling.plot", shakespeare_model, other, "-o", out, "--table", check=True)
    # --table: one row per evaluation of each run, its step and loss
    want = [r for r in read_metrics(other) if "val_loss" in r]
    table = p.stdout.split("other: validation loss\n", 1)[1].splitlines()[1:1 + len(want)]
    assert [(int(row.split()[0]), row.split()[-1]) for row in table] == [(r["step"], f"{r['val_loss']:.4f}") for r in want]
    # per run: train and val loss in 2 panels each, tokens/s, lr
    assert "(12 curves from 2 run(s))" in p.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    img = matplotlib.image.imread(out)
    assert img.shape[:2] == (800, 1200)
    # Both runs' colours (matplotlib's C0 and C1) are drawn; a third is not.
    assert count_colour(img, "#1f77b4") > 500 and count_colour(img, "#ff7f0e") > 500
    assert count_colour(img, "#2ca02c") == 0
    assert math.isfinite(img.sum())


# A run folder given to sample, convert or eval means its newest checkpoint whose checksums verify,
# as a resume does: a damaged newer one is skipped, in one line on stderr, never read silently.

@pytest.fixture(scope="module")
def saved_twice(data_root, tmp_path_factory):
    """A 4-step tiny run with checkpoints at steps 2 and 4 (copy it before changing it)."""
    run_dir = tmp_path_factory.mktemp("twice") / "run"
    run_module("scaling.train", *tiny_args(data_root, run_dir, "--train.max_steps=4", "--checkpoint.every=2",
                                           "--train.eval_every=0"), check=True)
    return run_dir


@pytest.mark.parametrize("command", ["sample", "convert", "eval"])
def test_a_run_folder_with_a_damaged_newest_checkpoint_is_read_from_the_older_one_saying_so(
        command, saved_twice, data_root, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved_twice, run)
    older, newest = run / "checkpoints" / "step_2", run / "checkpoints" / "step_4"
    shard = next(newest.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1  # the same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    args = {"sample": [run, "--max-new-tokens", 4, "--device", "cpu"],
            "convert": [run, tmp_path / "out.pt"],
            "eval": [run, "loss", "--data", data_root / "shakes", "--sequences", 1, "--device", "cpu"]}[command]
    p = run_module(f"scaling.{command}", *args)
    assert p.returncode == 0, p.stderr
    assert p.stderr.splitlines() == [f"warning: checkpoint: skipping {newest}: checksum mismatch in {shard.name} "
                                     f"(the file changed after it was saved) (left in place); using {older}",
                                     f"loaded {older} (step 2)"]
    assert shard.read_bytes() == data  # left as it was


# Which weights eval read, and their step, is one line on stderr; stdout stays one JSON line.

def test_eval_names_the_checkpoint_step_it_loaded(saved_twice, data_root):
    p = run_module("scaling.eval", saved_twice, "loss", "--data", data_root / "shakes", "--sequences", 1,
                   "--device", "cpu", check=True)
    assert p.stderr == f"loaded {saved_twice / 'checkpoints' / 'step_4'} (step 4)\n", p.stderr
    assert json.loads(p.stdout)["sequences"] == 1


@pytest.mark.parametrize("to, says", [("pt", "step 4, converted from {ckpt}"), ("nanogpt", "step 4"),
                                      pytest.param("hf", "no step recorded", marks=pytest.mark.slow)])
def test_eval_of_an_export_names_the_file_and_the_step_it_records(to, says, saved_twice, data_root, tmp_path):
    # our .pt keeps the run's record, nanoGPT's ckpt.pt the step as iter_num, Hugging Face's config.json no step
    out = tmp_path / ("hf" if to == "hf" else "model.pt")
    run_module("scaling.convert", saved_twice, out, "--to", to, check=True)
    p = run_module("scaling.eval", out, "loss", "--data", data_root / "shakes", "--sequences", 1,
                   "--device", "cpu", check=True)
    assert p.stderr == f"loaded {out} ({says.format(ckpt=saved_twice / 'checkpoints' / 'step_4')})\n", p.stderr


SPLIT_PROBE = r'''
import json, sys, torch, torch.distributed as dist
from scaling.data import TokenWindows
from scaling.eval import mean_loss
from scaling.model import GPT, gpt_config

data, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
windows = TokenWindows(data, "val", 32)
firsts = {tuple(windows.window(w)[:32].tolist()): w for w in range(5)}  # a window by its tokens


class Recording(GPT):
    """Notes which windows each forward gets."""
    seen = []

    def forward(self, idx, targets=None, **kw):
        self.seen.append([firsts.get(tuple(r.tolist())) for r in idx])
        return super().forward(idx, targets, **kw)


torch.manual_seed(0)
model = Recording(gpt_config("tiny", block_size=32, vocab_size=windows.vocab_size))
model.init_weights(0)
split = mean_loss(model, windows, 5, 2, torch.device("cpu"), dp_group=dist.group.WORLD)
seen, model.seen = model.seen, []
alone = mean_loss(model, windows, 5, 2, torch.device("cpu"))
every = [None] * dist.get_world_size()
dist.all_gather_object(every, seen)
if dist.get_rank() == 0:
    json.dump({"split": split, "alone": alone, "seen": every}, open(out, "w"))
dist.barrier()  # every rank done before any tears its group down (gloo aborted a rank there)
dist.destroy_process_group()
'''


def test_validation_splits_its_windows_over_data_parallel_ranks_with_the_loss_of_one_process(data_root, tmp_path):
    """5 windows in batches of 2 over 2 ranks: rank 0 takes 0, 2, 4 and rank 1 takes 1, 3, then
    one more forward (window 0, weighed 0) to match rank 0's count, which FSDP's gathers need."""
    (tmp_path / "probe.py").write_text(SPLIT_PROBE)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(tmp_path / "probe.py"), str(data_root / "shakes"), str(tmp_path / "out.json")],
                       cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((tmp_path / "out.json").read_text())
    assert r["seen"] == [[[0, 2], [4]], [[1, 3], [0]]]
    assert r["split"] == pytest.approx(r["alone"], rel=1e-6)

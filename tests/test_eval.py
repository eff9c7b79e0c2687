"""Evaluation and plots: split loss, HellaSwag scoring on a local file, the curves figure."""

import json
import math
import random

import numpy as np
import pytest

from conftest import SHAKESPEARE, read_metrics, run_module, tiny_args


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

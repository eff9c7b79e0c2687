"""Evaluate a model: python -m scaling.eval MODEL (loss --data DIR | hellaswag [--file F])

MODEL is anything scaling.convert reads: a run or checkpoint folder, our .pt, a Hugging Face
GPT-2 folder or a nanoGPT ckpt.pt. One line on stderr names what was loaded and its step
(`loaded runs/x/checkpoints/step_500 (step 500)`); stdout is one JSON line of results.

loss: mean next-token loss over the first --sequences windows of --seq-len tokens (default: the
  model's block_size; longer is refused) of a prepared split (the published GPT-2 losses on
  OpenWebText val are 3.12 / 2.84 / 2.67 / 2.54 for 124M / 350M / 774M / 1.5B; README shows the
  commands). The dataset must be tokenized as the model was: its meta.json is checked against
  the tokenizer.json our checkpoints keep.
hellaswag: the multiple-choice benchmark llm.c and modded-nanogpt report. Each example's four
  endings are scored by the model's loss on the ending's tokens after the context; acc takes the
  ending with the lowest total loss, acc_norm the lowest mean loss per token (what llm.c
  reports; GPT-2 124M scores about 0.29). The validation file is downloaded on first use into
  ~/.cache/scaling (or $XDG_CACHE_HOME/scaling); offline, pass a copy with --file.
"""

import argparse
import contextlib
import json
import os
import sys
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from scaling.errors import die
from scaling.sources import NETWORK_ERRORS

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


@torch.no_grad()
def mean_loss(model, windows, n: int, batch: int, device, loss_ctx=contextlib.nullcontext, dp_group=None) -> float:
    """Mean next-token loss over the first n windows of a split, batch windows at a time: the
    same sequences every time, whatever the batch or the layout, so values compare across steps
    and runs. Training's validation loss (loss_ctx: TP's loss parallelism) and `scaling.eval
    loss` are this one function.

    dp_group: the data-parallel ranks split the windows between them (rank r takes r, r + dp,
    ...) and sum their totals; ranks of one tensor-parallel group take the same ones. Every rank
    runs the same number of forwards, FSDP's gathers being collective: a rank out of windows
    runs one more on window 0 and counts it with weight 0."""
    from scaling.parallel import local_value
    dp, rank = (dist.get_world_size(dp_group), dist.get_rank(dp_group)) if dp_group is not None else (1, 0)
    mine = list(range(rank, n, dp))
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    for first in range(0, -(-n // dp), batch):
        ws = mine[first:first + batch]
        rows = np.stack([windows.window(w) for w in ws or [0]])
        xy = torch.from_numpy(rows.astype(np.int64)).to(device)
        with loss_ctx():
            total += local_value(model(xy[:, :-1], xy[:, 1:])).float() * len(ws)
    if dp > 1:
        dist.all_reduce(total, group=dp_group)
    model.train(was_training)
    return (total / n).item()


def split_loss(model, data_dir: str, split: str, seq_len: int, sequences: int, batch: int, device) -> dict:
    from scaling.data import TokenWindows
    windows = TokenWindows(data_dir, split, seq_len)
    n = min(sequences, windows.num_windows)
    return {"loss": mean_loss(model, windows, n, batch, device), "seq_len": seq_len, "sequences": n,
            "tokens": n * seq_len}


def check_data(data_dir: str, tok: dict | None, model) -> None:
    """The dataset's ids must mean to the model what they meant in training: another tokenizer's
    ids give a meaningless loss, or an IndexError in the embedding (a device-side assert on GPU)
    once one is past the model's vocabulary. tok: the model's tokenizer.json, None where its
    weights do not say (then only the range is checked). TokenWindows checks every id against
    meta.json's vocab_size, so checking that against the model's closes the gap."""
    from scaling.checkpoint import tokenizer_change
    from scaling.data import load_meta, tokenizer_spec
    meta = load_meta(data_dir)
    theirs = f"'{meta['tokenizer']}' tokens (vocab_size {meta['vocab_size']}, its meta.json)"
    if tok is not None and (why := tokenizer_change(tok, tokenizer_spec(meta))):  # the test a resume makes
        other = " with another alphabet" if tok["name"] == meta["tokenizer"] else ""
        raise ValueError(f"--data {data_dir} holds {theirs}; the model was trained on '{tok['name']}' tokens"
                         f"{other} (vocab_size {tok['vocab_size']}, its tokenizer.json)")
    vocab = tok["vocab_size"] if tok is not None else model.cfg.vocab_size
    if meta["vocab_size"] > vocab:
        raise ValueError(f"--data {data_dir} holds {theirs}, ids the model's {vocab}-token vocabulary does not have")


def hellaswag_examples(path: str | None) -> list[dict]:
    """The validation examples: from --file, else downloaded once into ~/.cache/scaling."""
    if path is None:
        path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scaling" / "hellaswag_val.jsonl"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")  # a broken download never looks complete
            try:
                urllib.request.urlretrieve(HELLASWAG_URL, tmp)
            except NETWORK_ERRORS as e:
                tmp.unlink(missing_ok=True)
                raise ConnectionError(f"no network: cannot download HellaSwag's validation set from {HELLASWAG_URL} "
                                      f"({e}); fetch that file elsewhere and pass --file PATH") from None
            tmp.replace(path)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--file: {path} not found")
    examples = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            ex = json.loads(line) if line.strip() else None
        except ValueError:
            raise ValueError(f"{path}: line {n} is not JSON; expected HellaSwag's hellaswag_val.jsonl") from None
        if ex is not None:
            if not isinstance(ex, dict) or not {"ctx", "endings", "label"} <= ex.keys():
                raise ValueError(f"{path}: line {n} lacks ctx, endings and label; expected HellaSwag's hellaswag_val.jsonl")
            examples.append(ex)
    return examples


@torch.no_grad()
def score_example(model, tokenizer, ex: dict, device) -> tuple[int, int]:
    """(prediction by total ending loss, prediction by mean ending loss) for one example."""
    ctx = tokenizer.encode(ex["ctx"])
    # Each ending follows the context after a space, as GPT-2 would have seen it in running text.
    ends = [tokenizer.encode(" " + e) for e in ex["endings"]]
    room = model.cfg.block_size + 1 - max(len(e) for e in ends)
    ctx = ctx[-room:] if room > 0 else ctx[:0]  # the model sees at most block_size tokens
    T = max(len(ctx) + len(e) for e in ends)
    rows = torch.zeros((len(ends), T), dtype=torch.long)
    mask = torch.zeros((len(ends), T), dtype=torch.bool)
    for i, e in enumerate(ends):
        seq = ctx + e
        rows[i, :len(seq)] = torch.tensor(seq)
        mask[i, len(ctx):len(seq)] = True
    rows, mask = rows.to(device), mask.to(device)
    logits = model(rows[:, :-1]).float()
    losses = F.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="none")  # (4, T-1)
    m = mask[:, 1:].float()
    total = (losses * m).sum(1)
    mean = total / m.sum(1)
    return int(total.argmin()), int(mean.argmin())


def hellaswag(model, tokenizer, examples: list[dict], device, limit: int | None = None) -> dict:
    examples = examples[:limit] if limit else examples
    acc = acc_norm = 0
    for ex in examples:
        pred, pred_norm = score_example(model, tokenizer, ex, device)
        acc += pred == int(ex["label"])
        acc_norm += pred_norm == int(ex["label"])
    n = len(examples)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "examples": n}


def tokenizer_of(tok: dict | None, model):
    """The tokenizer to encode HellaSwag with: the model's own, or GPT-2's for weights that do
    not say, if the model has rows for all of its ids."""
    from scaling.tokenizer import GPT2Tokenizer, get_tokenizer
    t = get_tokenizer(tok["name"], tok) if tok is not None else GPT2Tokenizer()
    if t.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"the model has {model.cfg.vocab_size} token ids, fewer than GPT-2's tokenizer "
                         f"({t.vocab_size}), which weights without a tokenizer.json are scored with")
    return t


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m scaling.eval", description=__doc__.splitlines()[0])
    ap.error = die  # one line, like every bad input, not argparse's usage block
    ap.add_argument("model", help="run/checkpoint folder, .pt, Hugging Face folder or nanoGPT ckpt.pt")
    ap.add_argument("task", choices=["loss", "hellaswag"])
    ap.add_argument("--data", help="loss: a prepared dataset folder, e.g. data/openwebtext")
    ap.add_argument("--split", default="val")
    ap.add_argument("--seq-len", type=int, help="loss: tokens per window (default: the model's block_size)")
    ap.add_argument("--sequences", type=int, default=500, help="loss: windows to evaluate")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--file", help="hellaswag: a local hellaswag_val.jsonl instead of the download")
    ap.add_argument("--limit", type=int, help="hellaswag: only the first N examples")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a = ap.parse_args(argv)
    for opt, value in (("--seq-len", a.seq_len), ("--sequences", a.sequences), ("--batch", a.batch),
                       ("--limit", a.limit)):
        if value is not None and value < 1:
            die(f"{opt}: must be >= 1, got {value}")
    from scaling.distributed import pick_device
    device = pick_device(a.device)
    try:
        if a.task == "loss" and not a.data:
            raise ValueError("loss needs --data DIR (a prepared dataset)")
        examples = hellaswag_examples(a.file) if a.task == "hellaswag" else None  # before a long model load
        from scaling.weights import load_any, loaded_line
        model, tok, run = load_any(a.model, device)
        block = model.cfg.block_size
        if a.task == "loss":
            seq_len = a.seq_len or block
            if seq_len > block:  # it has no position embeddings past block_size
                raise ValueError(f"--seq-len: {seq_len} exceeds the model's block_size {block}")
            check_data(a.data, tok, model)
        else:
            tokenizer = tokenizer_of(tok, model)
        # Once the input is known good (bad input is one line), before the long part: stdout is the JSON.
        print(loaded_line(a.model, run), file=sys.stderr, flush=True)
        if a.task == "loss":
            r = split_loss(model, a.data, a.split, seq_len, a.sequences, a.batch, device)
        else:
            r = hellaswag(model, tokenizer, examples, device, a.limit)
    except (FileNotFoundError, ValueError, KeyError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"model": a.model, "task": a.task, **r}))


if __name__ == "__main__":
    main()

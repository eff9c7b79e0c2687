"""Generate text from a trained model.

python -m scaling.sample RUN_DIR_OR_CHECKPOINT [--prompt TEXT] [--max-new-tokens N] ...
A run folder means its newest complete checkpoint; one line on stderr names the checkpoint
loaded and its step (`loaded runs/x/checkpoints/step_500 (step 500)`), stdout is the samples.
"""

import argparse
import math
import sys
from pathlib import Path

import torch

from scaling.config import ConfigError, die
from scaling.distributed import pick_device


def check_prompt(tokenizer, prompt: str):
    try:
        tokenizer.encode(prompt)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"logging.sample_prompt: {prompt!r} cannot be encoded by the dataset's tokenizer "
                          f"({type(e).__name__}: {e})") from None


def sample_text(model, tokenizer, prompt: str, n: int, temperature=0.8, top_k=200, seed=0,
                device="cpu") -> str:
    ids = tokenizer.encode(prompt) or [tokenizer.eot or 0]
    idx = torch.tensor([ids], device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    out = model.generate(idx, n, temperature=temperature, top_k=top_k, generator=g, vocab_size=tokenizer.vocab_size)
    model.train()
    return tokenizer.decode(out[0].tolist())


def check_args(a):
    """What generate() would otherwise fail on deep inside, or silently do wrong (a negative
    temperature samples the least likely tokens)."""
    if not Path(a.path).is_dir():
        die(f"{a.path}: {'not a folder' if Path(a.path).exists() else 'not found'} "
            f"(expected a run folder or a checkpoint folder)")
    for opt, value, least in (("--max-new-tokens", a.max_new_tokens, 0), ("--top-k", a.top_k, 1),
                              ("--num-samples", a.num_samples, 1)):
        if value < least:
            die(f"{opt}: must be >= {least}, got {value}")
    if not 0 <= a.temperature < math.inf:
        die(f"--temperature: must be finite and >= 0 (0 is greedy), got {a.temperature}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m scaling.sample", description=__doc__.splitlines()[0])
    ap.error = die  # one line, like every bad input, not argparse's usage block
    ap.add_argument("path", help="run folder or checkpoint folder")
    ap.add_argument("--prompt", default="\n")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    ap.add_argument("--top-k", type=int, default=200)
    ap.add_argument("--num-samples", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                    help="auto: the run's train.dtype, so a bf16 run samples as its own end-of-training "
                         "sample did (bf16 weights and activations, fp32 logits)")
    a = ap.parse_args(argv)
    check_args(a)
    from scaling.weights import load_checkpoint, loaded_line, saved_counts
    try:
        device = pick_device(a.device)
        model, tok, cfg, ckpt = load_checkpoint(a.path, device=device)
    except (OSError, ValueError, ConfigError) as e:  # OSError: no network for GPT-2's BPE files, too
        die(str(e))
    try:
        tok.encode(a.prompt)
    except ValueError as e:  # the char tokenizer knows only its dataset's alphabet
        die(f"--prompt: {e}")
    # Which checkpoint of a run folder this is, on stderr: stdout is the samples alone.
    print(loaded_line(a.path, {"checkpoint": str(ckpt), **saved_counts(ckpt)}), file=sys.stderr, flush=True)
    if (cfg.train.dtype if a.dtype == "auto" else a.dtype) == "bf16":
        model.to(torch.bfloat16)  # what FSDP's bf16 mixed precision computes with, in one process
    for i in range(a.num_samples):
        text = sample_text(model, tok, a.prompt, a.max_new_tokens, a.temperature, a.top_k,
                           seed=a.seed + i, device=device)
        print(text)
        if i + 1 < a.num_samples:
            print("-" * 40)


if __name__ == "__main__":
    with torch.inference_mode():
        main()

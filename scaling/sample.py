"""Generate text from a trained model.

python -m scaling.sample RUN_DIR_OR_CHECKPOINT [--prompt TEXT] [--max-new-tokens N] ...
A run folder means its newest complete checkpoint.
"""

import argparse

import torch

from scaling.config import die
from scaling.config import ConfigError
from scaling.distributed import pick_device
from scaling.train import sample_text


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m scaling.sample", description=__doc__.splitlines()[0])
    ap.add_argument("path", help="run folder or checkpoint folder")
    ap.add_argument("--prompt", default="\n")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    ap.add_argument("--top-k", type=int, default=200)
    ap.add_argument("--num-samples", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a = ap.parse_args(argv)
    from scaling.checkpoint import load_model
    try:
        device = pick_device(a.device)
        model, tok, _ = load_model(a.path, device=device)
    except (FileNotFoundError, ValueError, ConfigError) as e:
        die(str(e))
    for i in range(a.num_samples):
        text = sample_text(model, tok, a.prompt, a.max_new_tokens, a.temperature, a.top_k,
                           seed=a.seed + i, device=device)
        print(text)
        if i + 1 < a.num_samples:
            print("-" * 40)


if __name__ == "__main__":
    with torch.inference_mode():
        main()

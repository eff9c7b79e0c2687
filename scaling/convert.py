"""Import and export of GPT-2 weights: python -m scaling.convert SRC DST [--to hf|nanogpt|pt]

SRC may be any of: our checkpoint or run folder (a DCP checkpoint, any layout), our consolidated
.pt file, a Hugging Face GPT-2 folder (config.json + model.safetensors or pytorch_model.bin), or
a nanoGPT ckpt.pt. DST is written as a Hugging Face folder (--to hf, loadable by
GPT2LMHeadModel.from_pretrained), a nanoGPT ckpt.pt (--to nanogpt), or one consolidated .pt
file (--to pt, the default). Recipes start from any SRC with model.init_from. The formats
themselves are in scaling/weights.py. One line on stderr names what was read and its step (a run
folder's checkpoint: `loaded runs/x/checkpoints/step_500 (step 500)`); a .pt file keeps the step
and the checkpoint it came from, a nanoGPT ckpt.pt the step as iter_num.

A Hugging Face folder holds config.json, model.safetensors, generation_config.json and a model
card (README.md: the run's steps, tokens and final validation loss, the tokenizer, the shape,
how to load it), and for a GPT-2 BPE model the tokenizer files (vocab.json, merges.txt,
tokenizer_config.json, special_tokens_map.json), so that AutoTokenizer and
pipeline("text-generation") load it. Hugging Face has no tokenizer class for our byte and char
tokenizers: their exports have no tokenizer files, and a note says so.

An existing DST is refused unless --overwrite is given: a file, or for --to hf a folder that is
not empty. Files are written under temporary names beside DST and renamed into place only when
whole, so a failure (a full disk) leaves DST as it was. With --overwrite into a Hugging Face
folder, tokenizer files that the new export does not write are removed (they would load as its
tokenizer).
"""

import argparse
import sys
from pathlib import Path

from scaling.errors import die
from scaling.weights import WriteError, loaded_line, read_source, tokenizer_note, write_weights


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m scaling.convert", description=__doc__.splitlines()[0])
    ap.error = die  # one line, like every bad input, not argparse's usage block
    ap.add_argument("src", help="our checkpoint/run folder or .pt, a Hugging Face folder, or a nanoGPT ckpt.pt")
    ap.add_argument("dst", help="the file (--to pt, nanogpt) or folder (--to hf) to write")
    ap.add_argument("--to", choices=["hf", "nanogpt", "pt"], default="pt")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing DST file; with --to hf, write the export into a folder that is "
                         "not empty (other files are kept, except tokenizer files the export does not write). "
                         "Without it, an existing file or a non-empty folder is refused. The old files stay "
                         "until the new ones are whole")
    a = ap.parse_args(argv)
    dst = Path(a.dst)
    if a.to == "hf" and dst.exists() and not dst.is_dir():
        die(f"{a.dst}: is a file, --to hf writes a folder")
    if a.to != "hf" and dst.is_dir():
        die(f"{a.dst}: is a folder, --to {a.to} writes one file")
    # Checked before the (possibly long) read. A non-empty folder, not just one holding
    # config.json: weights of another model beside ours would make a folder that is neither.
    if a.to == "hf" and dst.is_dir() and any(dst.iterdir()) and not a.overwrite:
        die(f"{a.dst}: folder is not empty; pass --overwrite to write the export into it")
    if a.to != "hf" and dst.exists() and not a.overwrite:
        die(f"{a.dst}: already exists; pass --overwrite to replace it")
    try:
        sd, cfg, vocab, tok, run = read_source(a.src)
        cfg = write_weights(sd, cfg, dst, a.to, vocab, tok, run)
    except WriteError as e:  # a failure, not bad input
        die(str(e), code=1)
    except (OSError, ValueError) as e:
        die(str(e))
    print(loaded_line(a.src, run), file=sys.stderr)  # which checkpoint of a run folder, and its step
    n = sum(v.numel() for k, v in sd.items() if k not in ("lm_head.weight", "wte.weight")) + cfg.vocab_size * cfg.n_embd
    print(f"wrote {a.dst} ({a.to}, {cfg.n_layer} layers, {cfg.n_embd} wide, {n:,} parameters)")
    if a.to == "hf" and (note := tokenizer_note(tok, cfg.vocab_size)):
        print(f"note: {note}")


if __name__ == "__main__":
    main()

"""Trained GPT-2 weights in every format we read or write: the one home for loading a model.

Reads our checkpoint or run folder (a DCP checkpoint, any layout), our consolidated .pt file, a
Hugging Face GPT-2 folder (config.json + model.safetensors or pytorch_model.bin) and a nanoGPT
ckpt.pt; writes a Hugging Face folder (loadable by GPT2LMHeadModel.from_pretrained), a nanoGPT
ckpt.pt or one consolidated .pt. load_model gives a model for inference (sample, eval),
load_pretrained starts training from any of them (model.init_from), and scaling.convert is the
command line over read_weights and write_weights.

Hugging Face GPT-2 stores its projections as Conv1D, weight shape (in, out), with q, k and v
fused into one c_attn; nanoGPT uses the same names with nn.Linear, shape (out, in); ours are
nn.Linear with q, k and v apart.
"""

import contextlib
import errno
import json
import os
import pickle
import shutil
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError

from scaling.checkpoint import resolve_checkpoint
from scaling.config import load_config, model_config
from scaling.errors import ConfigError
from scaling.model import GPTConfig
from scaling.tokenizer import TOKENIZERS

def _pairs(n_layer: int):
    """(our name, Hugging Face name, transposed?) for every tensor except q, k and v, which
    Hugging Face keeps fused in c_attn."""
    yield "wte.weight", "transformer.wte.weight", False
    yield "wpe.weight", "transformer.wpe.weight", False
    for i in range(n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b in (("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            yield f"{ours}{a}.weight", f"{theirs}{b}.weight", True  # Conv1D stores (in, out)
            yield f"{ours}{a}.bias", f"{theirs}{b}.bias", False
        for ln in ("ln_1", "ln_2"):
            for p in ("weight", "bias"):
                yield f"{ours}{ln}.{p}", f"{theirs}{ln}.{p}", False
    for p in ("weight", "bias"):
        yield f"ln_f.{p}", f"transformer.ln_f.{p}", False


def hf_to_ours(hf: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """A GPT2LMHeadModel (or GPT2Model, without the transformer. prefix) state dict -> ours."""
    hf = {k if k.startswith("transformer.") or k == "lm_head.weight" else "transformer." + k: v
          for k, v in hf.items()}
    out = {ours: hf[theirs].t() if t else hf[theirs] for ours, theirs, t in _pairs(n_layer) if theirs in hf}
    for i in range(n_layer):
        fused, ours = f"transformer.h.{i}.attn.c_attn.", f"blocks.{i}.attn."
        for n, w in zip("qkv", hf[fused + "weight"].t().chunk(3, dim=0)):
            out[f"{ours}{n}.weight"] = w
        if fused + "bias" in hf:
            for n, b in zip("qkv", hf[fused + "bias"].chunk(3)):
                out[f"{ours}{n}.bias"] = b
    out["lm_head.weight"] = out["wte.weight"]  # tied
    return {k: v.contiguous() for k, v in out.items()}


def ours_to_hf(sd: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """Our GPT state dict -> a GPT2LMHeadModel state dict."""
    out = {theirs: sd[ours].t() if t else sd[ours] for ours, theirs, t in _pairs(n_layer) if ours in sd}
    for i in range(n_layer):
        fused, ours = f"transformer.h.{i}.attn.c_attn.", f"blocks.{i}.attn."
        out[fused + "weight"] = torch.cat([sd[f"{ours}{n}.weight"] for n in "qkv"], dim=0).t()
        if f"{ours}q.bias" in sd:
            out[fused + "bias"] = torch.cat([sd[f"{ours}{n}.bias"] for n in "qkv"])
    out["lm_head.weight"] = sd["wte.weight"]
    return {k: v.contiguous() for k, v in out.items()}


# nanoGPT names its Linear layers like Hugging Face's Conv1D ones, transposed.
NANOGPT_LINEARS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def nanogpt_to_ours(sd: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    sd = {k.removeprefix("_orig_mod."): v for k, v in sd.items()}  # saved from a compiled model
    sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # masks
    return hf_to_ours({k: v.t() if k.endswith(NANOGPT_LINEARS) else v for k, v in sd.items()}, n_layer)


def ours_to_nanogpt(sd: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    hf = ours_to_hf(sd, n_layer)
    return {k: v.t().contiguous() if k.endswith(NANOGPT_LINEARS) else v for k, v in hf.items()}


def hf_config(c: GPTConfig, eot: int | None = 50256) -> dict:
    """config.json. eot: the id that ends a document (GPT-2's 50256, the byte tokenizer's 256,
    None for a char tokenizer): GPT2Config would otherwise default to 50256 whatever the vocabulary."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": c.n_layer,
            "n_head": c.n_head, "n_embd": c.n_embd, "n_positions": c.block_size, "n_ctx": c.block_size,
            "vocab_size": c.vocab_size, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
            "bos_token_id": eot, "eos_token_id": eot, "tie_word_embeddings": True}


# Hugging Face GPT-2 tokenizer files. Each of them is either written by an export or removed from
# a folder exported into with --overwrite: an old one would load as this model's tokenizer.
HF_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                      "tokenizer.json", "added_tokens.json")
EOT = "<|endoftext|>"


def exports_gpt2_tokenizer(tok: dict | None, vocab_size: int) -> bool:
    """Whether a Hugging Face export gets GPT-2's tokenizer files: the model was trained with GPT-2's
    BPE, or its weights do not say and have GPT-2's 50257 ids (Hugging Face GPT-2 weights; eval
    scores such weights with GPT-2's tokenizer too)."""
    return (tok or {}).get("name") == "gpt2" or (tok is None and vocab_size == 50257)


def tokenizer_note(tok: dict | None, vocab_size: int) -> str | None:
    """One line on a Hugging Face export's tokenizer, unless it is the GPT-2 BPE the weights record:
    that GPT-2's is assumed, or why the export has no tokenizer files."""
    if tok is None and vocab_size == 50257:
        return "the source does not record its tokenizer; the export has GPT-2's, whose 50257 ids it has"
    if exports_gpt2_tokenizer(tok, vocab_size):
        return None
    why = "which Hugging Face has no tokenizer class for; the export has no tokenizer files"
    if tok is None:
        return (f"the source does not record its tokenizer and its {vocab_size} ids are not GPT-2's 50257; "
                "the export has no tokenizer files")
    if tok["name"] == "byte":
        return (f"this model uses a byte tokenizer, {why} (encode text as its UTF-8 bytes: ids 0-255; "
                "256 ends a document)")
    return (f"this model uses a character tokenizer ({tok['vocab_size']} characters), {why} (id i is "
            "character i of the alphabet in README.md)")


def gpt2_tokenizer_files(folder: Path, block_size: int) -> dict:
    """{path: write(tmp)} for GPT-2's tokenizer as GPT2Tokenizer(Fast) loads it, built from tiktoken
    (its files or cache, no network when TIKTOKEN_CACHE_DIR is filled): built here, before any
    file is written, so that a missing BPE is bad input, not a failed write."""
    from scaling.tokenizer import GPT2Tokenizer, gpt2_vocab_and_merges
    vocab, merges = gpt2_vocab_and_merges(GPT2Tokenizer().enc)
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": block_size, **special,
              "add_prefix_space": False, "add_bos_token": False, "errors": "replace",
              # True turns " ." into "." on decode in transformers 4 (5 ignores it for BPE): not tiktoken's text
              "clean_up_tokenization_spaces": False,
              "added_tokens_decoder": {str(vocab[EOT]): {"content": EOT, "lstrip": False, "normalized": True,
                                                         "rstrip": False, "single_word": False, "special": True}}}
    return {folder / "vocab.json": _text(json.dumps(vocab, ensure_ascii=False)),
            folder / "merges.txt": _text("#version: 0.2\n" + "\n".join(merges) + "\n"),
            folder / "tokenizer_config.json": _text(json.dumps(config, indent=2)),
            folder / "special_tokens_map.json": _text(json.dumps(special, indent=2))}


def _text(s: str):
    return lambda tmp: tmp.write_text(s, encoding="utf-8")


def generation_config(eot: int | None) -> dict:
    """generation_config.json: generation stops at the end of a document, and padding with the
    same id (GPT-2 has no pad token) keeps the pipeline from warning that it picked one. No
    max_length: transformers 5 would warn on every call given max_new_tokens that both are set,
    and without one it makes 20 new tokens, at most up to the model's context (n_positions)."""
    return {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}


def model_card(cfg: GPTConfig, params: int, tok: dict | None, run: dict, folder: Path, cut_from: int) -> str:
    """README.md of a Hugging Face export: what the model is, how it was trained, how to load it."""
    unknown = "unknown"
    gpt2 = exports_gpt2_tokenizer(tok, cfg.vocab_size)
    if gpt2:
        tokenizer = (f"GPT-2 BPE (tiktoken's `gpt2`; vocab.json and merges.txt here): 50257 ids, `{EOT}` is 50256"
                     + (f" ({tokenizer_note(tok, cfg.vocab_size)})" if tok is None else ""))
    else:
        tokenizer = tokenizer_note(tok, cfg.vocab_size)
    val = unknown
    if "val_loss" in run:
        val = f"{run['val_loss']:.4f} (at step {run['val_step']})"
    padded = f", cut from {cut_from} padded rows" if cut_from > cfg.vocab_size else ""
    rows = [("Recipe / run", (run["name"] + (f" (run folder `{run['run_dir']}`)" if "run_dir" in run else ""))
                             if "name" in run else unknown),
            ("Checkpoint", f"`{run['checkpoint']}`" if "checkpoint" in run else unknown),
            ("Steps trained", f"{run['step']:,}" if "step" in run else unknown),
            ("Tokens seen", f"{run['tokens']:,}" if "tokens" in run else unknown),
            ("Final validation loss", val),
            ("Tokenizer", tokenizer),
            ("Architecture", f"GPT-2 (GPT2LMHeadModel): {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, "
                             f"{cfg.block_size}-token context, {cfg.vocab_size}-id vocabulary{padded}, "
                             f"{params:,} parameters, input and output embeddings tied")]
    load = _load_snippet(tok, gpt2, json.dumps(str(folder)), max(1, min(50, cfg.block_size // 2)))
    lines = ["---", "library_name: transformers", *(["pipeline_tag: text-generation"] if gpt2 else []),
             "tags: [gpt2, scaling]", "---", "", f"# {run.get('name', folder.name)}", "",
             "A GPT-2 model trained with scaling and exported by `python -m scaling.convert --to hf`.", "",
             *(f"- {k}: {v}" for k, v in rows), ""]
    if (tok or {}).get("name") == "char":
        lines += ["Alphabet (id i is character i), as JSON:", "", "```", json.dumps(tok["chars"]), "```", ""]
    lines += ["## Load it", "", "```python", load, "```", ""]
    return "\n".join(lines)


def _load_snippet(tok: dict | None, gpt2: bool, where: str, new: int) -> str:
    """Python that loads the export and continues a prompt greedily, encoding and decoding as the
    model's tokenizer does."""
    if gpt2:
        return ("from transformers import pipeline\n"
                f"generate = pipeline(\"text-generation\", model={where})\n"
                f"print(generate(\"Hello,\", max_new_tokens={new}, do_sample=False)[0][\"generated_text\"])")
    load = f"import torch\nfrom transformers import GPT2LMHeadModel\nmodel = GPT2LMHeadModel.from_pretrained({where})\n"
    name = (tok or {}).get("name")
    if name == "byte":
        return load + (f"ids = model.generate(torch.tensor([list(\"Hello,\".encode())]), max_new_tokens={new}, "
                       "do_sample=False)[0]\n"
                       "print(bytes(i for i in ids.tolist() if i < 256).decode(\"utf-8\", \"replace\"))")
    if name == "char":
        chars = tok["chars"]
        prompt = "Hello" if set("Hello") <= set(chars) else chars[-1]
        return load + (f"chars = {chars!r}\n"
                       f"ids = model.generate(torch.tensor([[chars.index(c) for c in {prompt!r}]]), "
                       f"max_new_tokens={new}, do_sample=False)[0]\n"
                       "print(\"\".join(chars[i] for i in ids.tolist()))")
    return load + "logits = model(input_ids).logits  # input_ids: token ids of the tokenizer it was trained with"


SOURCES = "our checkpoint or run folder or .pt, a Hugging Face GPT-2 folder or a nanoGPT ckpt.pt"
# What reading a file that is not a checkpoint raises, from json, torch.load's unpickler, safetensors,
# DCP, our configs and the converters' lookups of the tensors they need.
NOT_WEIGHTS = (OSError, EOFError, ValueError, KeyError, TypeError, AssertionError, RuntimeError,
               pickle.UnpicklingError, SafetensorError)


def read_weights(src: str | Path) -> tuple[dict[str, torch.Tensor], GPTConfig, int]:
    """(our state dict, its shape, the token ids in use) from any supported source; see the module
    docstring. The ids in use are the tokenizer's vocabulary for our checkpoints (the model's may
    be padded beyond it), the model's for other formats. Anything else is one ValueError naming
    src and what it should have been (FileNotFoundError if missing)."""
    sd, cfg, vocab, _, _ = read_source(src)
    return sd, cfg, vocab


def read_weights_and_tokenizer(src: str | Path) -> tuple[dict[str, torch.Tensor], GPTConfig, int, dict | None]:
    """read_weights, and the tokenizer the weights were trained with where they record it (our
    checkpoints' tokenizer.json, and our .pt files written from them): a dict with name and
    vocab_size (and chars for the char tokenizer), or None (Hugging Face and nanoGPT weights, and
    .pt files written from those, do not say)."""
    return read_source(src)[:4]


def read_source(src: str | Path) -> tuple[dict[str, torch.Tensor], GPTConfig, int, dict | None, dict]:
    """read_weights_and_tokenizer, and what our checkpoint and run folders say about the training
    behind the weights (see run_record; kept in our .pt files written from them; nanoGPT's
    iter_num as the step; {} for Hugging Face folders): what a model card and loaded_line report."""
    if not Path(src).exists():
        raise FileNotFoundError(f"{src}: not found (expected {SOURCES})")
    try:
        sd, cfg, vocab, tok, run = _read_weights(Path(src))
        check_tensors(sd, cfg)
    except NOT_WEIGHTS as e:
        why = f"no {e.args[0]!r}" if isinstance(e, KeyError) else (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{src}: cannot read weights ({why}); expected {SOURCES}") from None
    return sd, cfg, vocab, tok, run


def run_record(ckpt: Path, name: str) -> dict:
    """The recipe's name, the checkpoint, its step and tokens seen (recorded in the checkpoint)
    and the last validation loss logged at or before that step in the run folder's metrics.jsonl
    (if the checkpoint sits in a run folder that has one), with the step it was logged at."""
    record = {"name": name, "checkpoint": str(ckpt)}
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    if run_dir is not None:
        record["run_dir"] = str(run_dir)
    record.update(saved_counts(ckpt))
    last = None
    if run_dir is not None and (run_dir / "metrics.jsonl").is_file():
        from scaling.metrics import read_metrics  # skips (and names) damaged lines
        for r in read_metrics(run_dir / "metrics.jsonl"):
            if isinstance(r.get("val_loss"), (int, float)) and r["step"] <= record.get("step", r["step"]):
                last = r  # the newest: a run resumed from an older checkpoint logs its steps again
    if last is not None:
        record.update(val_loss=last["val_loss"], val_step=last["step"])
    return record


def saved_counts(ckpt: Path) -> dict:
    """{"step": ..., "tokens": ...} as the checkpoint recorded them (train.step, train.tokens): the
    folder's name need not say (a checkpoint folder may be copied under any name)."""
    saved = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    train = {k: 0 for k in ("step", "tokens") if f"train.{k}" in saved}
    if train:
        dcp.load({"train": train}, checkpoint_id=ckpt, no_dist=True)  # see _load_ours
    return {k: int(v) for k, v in train.items()}


def loaded_line(src: str | Path, run: dict) -> str:
    """The one line sample, eval and convert print (on stderr: their stdout is text, JSON or the
    export's summary) naming the weights they read: for a run folder the checkpoint it resolved
    to, and the step where the source records it (our folders and .pt files written from them,
    nanoGPT's iter_num). run: read_source's record."""
    step = f"step {run['step']}" if "step" in run else "no step recorded"
    if Path(src).is_dir() and "checkpoint" in run:  # our run or checkpoint folder
        return f"loaded {run['checkpoint']} ({step})"
    origin = f", converted from {run['checkpoint']}" if "checkpoint" in run else ""
    return f"loaded {src} ({step}{origin})"


def _read_weights(p: Path) -> tuple[dict[str, torch.Tensor], GPTConfig, int, dict | None, dict]:
    if p.is_dir() and (p / "config.json").is_file():  # Hugging Face
        c = json.loads((p / "config.json").read_text())
        if (p / "model.safetensors").is_file():
            from safetensors.torch import load_file
            hf = load_file(p / "model.safetensors")
        elif (p / "pytorch_model.bin").is_file():
            hf = _torch_load(p / "pytorch_model.bin")
        else:
            raise FileNotFoundError("config.json but neither model.safetensors nor pytorch_model.bin")
        if c.get("bias") is False:  # not a GPT-2 option; refuse rather than guess
            raise ValueError("unsupported config: bias=false")
        cfg = GPTConfig(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"],
                        block_size=c["n_positions"], vocab_size=c["vocab_size"])
        return hf_to_ours(hf, cfg.n_layer), cfg, cfg.vocab_size, None, {}
    if p.is_dir():  # our checkpoint or run folder
        model, tok, run_cfg, ckpt = _load_ours(p)
        sd = {k: v.detach() for k, v in model.state_dict().items()}
        return sd, model.cfg, tok["vocab_size"], tok, run_record(ckpt, run_cfg.name)
    ck = _torch_load(p)
    if isinstance(ck, dict) and "gpt_config" in ck:  # ours, consolidated
        cfg = GPTConfig(**ck["gpt_config"])
        tok = ck.get("tokenizer")  # absent in files written from other formats (and before it was kept)
        if tok is not None and not (isinstance(tok, dict) and tok.get("name") in TOKENIZERS
                                    and isinstance(tok.get("vocab_size"), int)):
            raise ValueError(f"its 'tokenizer' entry is not a tokenizer ({tok!r:.80})")
        run = ck.get("run", {})  # what the run folder it was written from said (absent for other sources)
        if not (isinstance(run, dict) and isinstance(run.get("step", 0), int)):
            raise ValueError(f"its 'run' entry is not a run record ({run!r:.80})")
        sd = {**ck["model"], "lm_head.weight": ck["model"]["wte.weight"]}
        return sd, cfg, ck.get("vocab", cfg.vocab_size), tok, run
    if isinstance(ck, dict) and "model_args" in ck:  # nanoGPT
        a = ck["model_args"]
        cfg = GPTConfig(n_layer=a["n_layer"], n_head=a["n_head"], n_embd=a["n_embd"], block_size=a["block_size"],
                        vocab_size=a["vocab_size"], dropout=a.get("dropout", 0.0), bias=a.get("bias", True))
        # nanoGPT saves only after iteration 0: an iter_num of 0 is an export that did not know the step
        step = ck.get("iter_num")
        run = {"step": step} if isinstance(step, int) and step > 0 else {}
        return nanogpt_to_ours(ck["model"], cfg.n_layer), cfg, cfg.vocab_size, None, run
    raise ValueError(f"a {type(ck).__name__} without 'gpt_config' or 'model_args'")


def _torch_load(path: Path):
    try:
        with warnings.catch_warnings():  # e.g. a foreign pickle's protocol: the error says enough
            warnings.simplefilter("ignore")  # (catch_warnings(action=...) is Python 3.11+; we support 3.10)
            return torch.load(path, map_location="cpu", weights_only=True)
    except NOT_WEIGHTS:  # its own messages (a bare KeyError: 101 for a text file) would say nothing
        raise ValueError("not a PyTorch file of tensors") from None


def check_tensors(sd: dict[str, torch.Tensor], cfg: GPTConfig):
    """Exactly the tensors, and shapes, of a GPT of shape cfg: what passes here loads without error."""
    from scaling.model import GPT
    with torch.device("meta"):
        want = GPT(cfg).state_dict()
    for k, v in want.items():
        if k not in sd:
            raise ValueError(f"no tensor {k}")
        if not isinstance(sd[k], torch.Tensor) or sd[k].shape != v.shape:
            raise ValueError(f"{k} has shape {tuple(getattr(sd[k], 'shape', ()))}, its config wants {tuple(v.shape)}")
    extra = [k for k in sd if k not in want]
    if extra:
        raise ValueError(f"unexpected tensor {extra[0]}")


def pad_vocab(sd: dict[str, torch.Tensor], cfg: GPTConfig, vocab_size: int) -> tuple[dict, GPTConfig]:
    """The embedding (and tied LM head) grown to vocab_size rows, e.g. GPT-2's 50257 to 50304 for
    tensor-core-sized kernels. The new rows are the mean of the real ones (as Hugging Face's
    resize_token_embeddings does): their logits are then the mean logit, so together the 47
    padded ids of GPT-2 take under 47/50257 of the probability (under 0.001 nats of loss) where
    zero rows, with GPT-2's negative logits, would take most of it. The logits of real ids are
    unchanged, and generation never samples padded ids."""
    wte = sd["wte.weight"]
    pad = wte.mean(dim=0, keepdim=True).expand(vocab_size - len(wte), -1)
    wte = torch.cat([wte, pad])
    return {**sd, "wte.weight": wte, "lm_head.weight": wte}, replace(cfg, vocab_size=vocab_size)


def strip_vocab(sd: dict[str, torch.Tensor], cfg: GPTConfig, vocab_size: int) -> tuple[dict, GPTConfig]:
    """The embedding (and tied LM head) cut to the vocab_size ids in use: padding removed."""
    wte = sd["wte.weight"][:vocab_size]
    return {**sd, "wte.weight": wte, "lm_head.weight": wte}, replace(cfg, vocab_size=vocab_size)


class WriteError(OSError):
    """Writing converted weights failed (disk full, no permission): one line naming the destination."""


def write_weights(sd: dict[str, torch.Tensor], cfg: GPTConfig, dst: str | Path, to: str,
                  vocab: int | None = None, tokenizer: dict | None = None, run: dict | None = None) -> GPTConfig:
    """Every file is written under a temporary name beside its destination and all are renamed
    into place only when all are whole: a failure or a kill midway leaves whatever dst held
    before (WriteError names dst and the cause). vocab: the token ids in use; a Hugging Face
    export is cut to them (GPT2LMHeadModel then loads GPT-2's 50257 rows from a model padded to
    50304), while nanoGPT (which trains GPT-2 padded itself) and our .pt keep the model's rows.
    tokenizer: what read_weights_and_tokenizer found, kept in our .pt so that eval can check a
    dataset against it; a Hugging Face export gets GPT-2's tokenizer files if it is GPT-2's (see
    exports_gpt2_tokenizer), and a model card (README.md) telling it and run's facts (read_source).
    Returns the shape written."""
    dst = Path(dst)
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    padded = cfg.vocab_size
    if to == "hf" and vocab is not None and vocab < cfg.vocab_size:
        sd, cfg = strip_vocab(sd, cfg, vocab)
    stale = []
    if to == "hf":
        from safetensors.torch import save_file
        if not cfg.bias:  # GPT2LMHeadModel would fill the missing biases with random values
            raise ValueError("--to hf: Hugging Face GPT-2 always has biases, this model has bias=False "
                             "(--to nanogpt or --to pt keep it)")
        hf = ours_to_hf(sd, cfg.n_layer)
        hf.pop("lm_head.weight")  # tied: Hugging Face re-ties it from wte on load
        gpt2 = exports_gpt2_tokenizer(tokenizer, cfg.vocab_size)
        eot = 50256 if gpt2 else (tokenizer or {}).get("eot")
        params = sum(v.numel() for v in hf.values())
        files = {dst / "model.safetensors": lambda t: save_file(hf, t, metadata={"format": "pt"}),
                 **(gpt2_tokenizer_files(dst, cfg.block_size) if gpt2 else {}),
                 dst / "generation_config.json": _text(json.dumps(generation_config(eot), indent=2)),
                 dst / "README.md": _text(model_card(cfg, params, tokenizer, run or {}, dst, padded)),
                 # renamed last: it is what marks a folder as Hugging Face weights
                 dst / "config.json": _text(json.dumps(hf_config(cfg, eot), indent=2))}
        stale = [dst / name for name in HF_TOKENIZER_FILES if dst / name not in files]
    elif to == "nanogpt":
        args = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size",
                                            "dropout")}
        ck = {"model": ours_to_nanogpt(sd, cfg.n_layer), "model_args": args, "iter_num": (run or {}).get("step", 0),
              "best_val_loss": float("inf"), "config": {}}
        files = {dst: lambda t: torch.save(ck, t)}
    else:
        sd.pop("lm_head.weight", None)  # tied to wte.weight
        ck = {"model": sd, "gpt_config": asdict(cfg), "vocab": vocab or cfg.vocab_size}
        if tokenizer is not None:
            ck["tokenizer"] = tokenizer
        if run:  # its step and provenance, for eval's loaded line and a later export's model card
            ck["run"] = run
        files = {dst: lambda t: torch.save(ck, t)}
    _write_all(dst, files, stale)
    return cfg


def _write_all(dst: Path, files: dict, stale=()):
    """files: {path: write(tmp_path)}. All written beside their paths, then the stale paths
    removed (files of an earlier export that would contradict these), then all renamed."""
    existed = dst.exists()
    folder = next(iter(files)).parent
    made = [d for d in (folder, *folder.parents) if not d.exists()]  # deepest first: removed on failure
    tmps = {}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for path, write in files.items():
            tmps[path] = path.with_name(path.name + ".tmp")
            write(tmps[path])
    except BaseException as e:
        # a write failure (not a bug, not ^C) is named, and the disk asked before its space is given back
        why = _why(e, folder) if isinstance(e, (OSError, RuntimeError, SafetensorError)) else None
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        for d in made:
            with contextlib.suppress(OSError):
                d.rmdir()
        if why is None:
            raise
        path, left = list(tmps)[-1] if tmps else dst, "is unchanged" if existed else "was not created"
        raise WriteError(f"writing {path} failed: {why}; {dst} {left}") from e
    for path in stale:
        path.unlink(missing_ok=True)
    for path, tmp in tmps.items():
        os.replace(tmp, path)


def _why(e: Exception, folder: Path) -> str:
    """The cause in a few words. torch.save reports a full disk as RuntimeError "unexpected pos"
    and safetensors wraps the OSError in its own error: ask the disk, as checkpoint.py does."""
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e):
        return "no space left on device"
    with contextlib.suppress(OSError):
        if shutil.disk_usage(folder).free < (1 << 20):
            return "no space left on device"
    return getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def load_model(path: str | Path, device="cpu"):
    """(model, tokenizer, config) from a checkpoint or run folder, for inference."""
    return load_checkpoint(path, device)[:3]


def load_checkpoint(path: str | Path, device="cpu"):
    """load_model, and the checkpoint folder it read: a run folder's newest good one."""
    from scaling.tokenizer import get_tokenizer
    model, tok_spec, cfg, ckpt = _load_ours(path, device)
    return model, get_tokenizer(tok_spec["name"], tok_spec), cfg, ckpt


def _load_ours(path: str | Path, device="cpu"):
    """(model, its tokenizer.json, config, the checkpoint folder) from a checkpoint or run folder.
    The tokenizer is not built here: GPT-2's BPE would need its files (or the network) just to
    convert or score ids."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from scaling.model import GPT

    ckpt = resolve_checkpoint(path)
    # The saved layout was for the training world; reading here is one process, also when rank 0
    # of a training world reads init_from (whose WORLD_SIZE is not this read's).
    cfg = load_config(str(ckpt / "config.yaml"), ["--parallel.dp_replicate=1", "--parallel.dp_shard=1",
                                                  "--parallel.tp=1"], world=1, per_node=1)
    tok_spec = json.loads((ckpt / "tokenizer.json").read_text())
    with torch.device("meta"):
        model = GPT(model_config(cfg, tok_spec["vocab_size"]))
    model.to_empty(device=device)
    model.tie_weights()
    sd = get_model_state_dict(model)
    # no_dist: under training's process group rank 0 alone reads init_from (load_pretrained)
    dcp.load({"model": sd}, checkpoint_id=ckpt, no_dist=True)
    model.eval()
    return model, tok_spec, cfg, ckpt


def load_any(src: str, device) -> tuple[torch.nn.Module, dict | None, dict]:
    """(model, tokenizer spec, run record) from any weights read_weights reads. The spec (name,
    vocab_size, ...) is the one our runs, checkpoints and .pt files record; None for weights that
    do not say (Hugging Face and nanoGPT GPT-2 weights, meant for GPT-2's tokenizer). The record
    is read_source's (the checkpoint and its step, for loaded_line)."""
    from scaling.model import GPT
    sd, cfg, _, tok, run = read_source(src)
    model = GPT(cfg)
    model.load_state_dict(sd)
    model.to(device).eval()
    return model, tok, run


def load_pretrained(model, cfg, log):
    """Overwrite the fresh weights with model.init_from's (fine-tuning). Rank 0 alone reads and
    checks the file; the others wait for its verdict (a bad file is one line from rank 0 and exit
    2 on every rank), then receive their shard of each tensor by broadcast, one tensor at a time:
    the whole state dict sits in rank 0's host memory only (6.2 GB at XL, not 6.2 GB per rank)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from scaling.distributed import on_rank0

    sd = {}  # stays empty on the other ranks: set_model_state_dict takes theirs from rank 0

    def read():
        sd.update(_pretrained(cfg.model.init_from, model.cfg))

    on_rank0(read)
    # The process group, not the launcher's WORLD_SIZE: without a group on_rank0 ran read() here
    # too, and there is nothing to broadcast over.
    many = dist.is_initialized() and dist.get_world_size() > 1
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=many))
    model.tie_weights()
    log(f"initialised from {cfg.model.init_from}", flush=True)


def _pretrained(src: str, ours: GPTConfig) -> dict[str, torch.Tensor]:
    """src's state dict fitted to a model of shape ours: the vocabulary padded, the positions cut
    to its context; a ConfigError naming model.init_from where it does not fit."""
    try:
        sd, have, _ = read_weights(src)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ConfigError(f"model.init_from: {e}") from None
    if have.vocab_size < ours.vocab_size:  # e.g. GPT-2's 50257 rows into a recipe padded to 50304
        sd, have = pad_vocab(sd, have, ours.vocab_size)
    for key in ("n_layer", "n_head", "n_embd", "vocab_size", "bias"):
        if getattr(have, key) != getattr(ours, key):
            raise ConfigError(f"model.init_from: {src} has {key}={getattr(have, key)}, "
                              f"the recipe {key}={getattr(ours, key)}")
    if have.block_size < ours.block_size:
        raise ConfigError(f"model.init_from: {src} has block_size={have.block_size}, "
                          f"smaller than the recipe's {ours.block_size}")
    sd["wpe.weight"] = sd["wpe.weight"][: ours.block_size]  # a shorter context keeps the first positions
    return sd

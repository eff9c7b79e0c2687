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

import json
import os
import pickle
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


def hf_config(c: GPTConfig) -> dict:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": c.n_layer,
            "n_head": c.n_head, "n_embd": c.n_embd, "n_positions": c.block_size, "n_ctx": c.block_size,
            "vocab_size": c.vocab_size, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
            "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True}


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
    if not Path(src).exists():
        raise FileNotFoundError(f"{src}: not found (expected {SOURCES})")
    try:
        sd, cfg, vocab = _read_weights(Path(src))
        check_tensors(sd, cfg)
    except NOT_WEIGHTS as e:
        why = f"no {e.args[0]!r}" if isinstance(e, KeyError) else (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{src}: cannot read weights ({why}); expected {SOURCES}") from None
    return sd, cfg, vocab


def _read_weights(p: Path) -> tuple[dict[str, torch.Tensor], GPTConfig, int]:
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
        return hf_to_ours(hf, cfg.n_layer), cfg, cfg.vocab_size
    if p.is_dir():  # our checkpoint or run folder
        model, tok, _ = load_model(p)
        return {k: v.detach() for k, v in model.state_dict().items()}, model.cfg, tok.vocab_size
    ck = _torch_load(p)
    if isinstance(ck, dict) and "gpt_config" in ck:  # ours, consolidated
        cfg = GPTConfig(**ck["gpt_config"])
        return {**ck["model"], "lm_head.weight": ck["model"]["wte.weight"]}, cfg, ck.get("vocab", cfg.vocab_size)
    if isinstance(ck, dict) and "model_args" in ck:  # nanoGPT
        a = ck["model_args"]
        cfg = GPTConfig(n_layer=a["n_layer"], n_head=a["n_head"], n_embd=a["n_embd"], block_size=a["block_size"],
                        vocab_size=a["vocab_size"], dropout=a.get("dropout", 0.0), bias=a.get("bias", True))
        return nanogpt_to_ours(ck["model"], cfg.n_layer), cfg, cfg.vocab_size
    raise ValueError(f"a {type(ck).__name__} without 'gpt_config' or 'model_args'")


def _torch_load(path: Path):
    try:
        with warnings.catch_warnings(action="ignore"):  # e.g. a foreign pickle's protocol: the error says enough
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


def write_weights(sd: dict[str, torch.Tensor], cfg: GPTConfig, dst: str | Path, to: str,
                  vocab: int | None = None) -> GPTConfig:
    """Each file is written under a temporary name and renamed when complete: an error or a kill
    midway leaves whatever dst held before. vocab: the token ids in use; a Hugging Face export is
    cut to them (GPT2LMHeadModel then loads GPT-2's 50257 rows from a model padded to 50304),
    while nanoGPT (which trains GPT-2 padded itself) and our .pt keep the model's rows. Returns the
    shape written."""
    dst = Path(dst)
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    if to == "hf" and vocab is not None and vocab < cfg.vocab_size:
        sd, cfg = strip_vocab(sd, cfg, vocab)
    if to == "hf":
        from safetensors.torch import save_file
        if not cfg.bias:  # GPT2LMHeadModel would fill the missing biases with random values
            raise ValueError("--to hf: Hugging Face GPT-2 always has biases, this model has bias=False "
                             "(--to nanogpt or --to pt keep it)")
        dst.mkdir(parents=True, exist_ok=True)
        hf = ours_to_hf(sd, cfg.n_layer)
        hf.pop("lm_head.weight")  # tied: Hugging Face re-ties it from wte on load
        _replace(dst / "model.safetensors", lambda t: save_file(hf, t, metadata={"format": "pt"}))
        _replace(dst / "config.json", lambda t: t.write_text(json.dumps(hf_config(cfg), indent=2)))
    elif to == "nanogpt":
        args = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size",
                                            "dropout")}
        ck = {"model": ours_to_nanogpt(sd, cfg.n_layer), "model_args": args, "iter_num": 0,
              "best_val_loss": float("inf"), "config": {}}
        _replace(dst, lambda t: torch.save(ck, t))
    else:
        sd.pop("lm_head.weight", None)  # tied to wte.weight
        _replace(dst, lambda t: torch.save({"model": sd, "gpt_config": asdict(cfg), "vocab": vocab or cfg.vocab_size}, t))
    return cfg


def _replace(path: Path, write):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    open(tmp, "wb").close()  # an OSError naming the file, not torch.save's RuntimeError
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def load_model(path: str | Path, device="cpu"):
    """(model, tokenizer, config) from a checkpoint or run folder, for inference."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from scaling.model import GPT
    from scaling.tokenizer import get_tokenizer

    ckpt = resolve_checkpoint(path)
    # The saved layout was for the training world; inference here is one process.
    cfg = load_config(str(ckpt / "config.yaml"), ["--parallel.dp_replicate=1", "--parallel.dp_shard=1",
                                                  "--parallel.tp=1"])
    tok_spec = json.loads((ckpt / "tokenizer.json").read_text())
    with torch.device("meta"):
        model = GPT(model_config(cfg, tok_spec["vocab_size"]))
    model.to_empty(device=device)
    model.tie_weights()
    sd = get_model_state_dict(model)
    dcp.load({"model": sd}, checkpoint_id=ckpt)
    model.eval()
    return model, get_tokenizer(tok_spec["name"], tok_spec), cfg


def load_any(src: str, device) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) from any weights read_weights reads: our runs and checkpoints with their own
    tokenizer, Hugging Face and nanoGPT GPT-2 weights with GPT-2's."""
    from scaling.model import GPT
    from scaling.tokenizer import GPT2Tokenizer, get_tokenizer
    p = Path(src)
    tok_file = next((f for f in (p / "tokenizer.json", *sorted(p.glob("checkpoints/step_*/tokenizer.json")))
                     if f.is_file()), None) if p.is_dir() else None
    sd, cfg, _ = read_weights(src)
    model = GPT(cfg)
    model.load_state_dict(sd)
    model.to(device).eval()
    if tok_file is not None:
        spec = json.loads(tok_file.read_text())
        return model, get_tokenizer(spec["name"], spec)
    return model, GPT2Tokenizer()  # Hugging Face and nanoGPT GPT-2 weights


def load_pretrained(model, cfg, log):
    """Overwrite the fresh weights with model.init_from's (fine-tuning). Every rank reads the file
    and keeps its own shard of each tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    try:
        sd, src, _ = read_weights(cfg.model.init_from)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ConfigError(f"model.init_from: {e}") from None
    ours = model.cfg
    if src.vocab_size < ours.vocab_size:  # e.g. GPT-2's 50257 rows into a recipe padded to 50304
        sd, src = pad_vocab(sd, src, ours.vocab_size)
    for key in ("n_layer", "n_head", "n_embd", "vocab_size", "bias"):
        if getattr(src, key) != getattr(ours, key):
            raise ConfigError(f"model.init_from: {cfg.model.init_from} has {key}={getattr(src, key)}, "
                              f"the recipe {key}={getattr(ours, key)}")
    if src.block_size < ours.block_size:
        raise ConfigError(f"model.init_from: {cfg.model.init_from} has block_size={src.block_size}, "
                          f"smaller than the recipe's {ours.block_size}")
    sd["wpe.weight"] = sd["wpe.weight"][: ours.block_size]  # a shorter context keeps the first positions
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True))
    model.tie_weights()
    log(f"initialised from {cfg.model.init_from}", flush=True)

"""Will it fit, and how long will it take? python -m scaling.plan RECIPE --gpus N [--gpu h100] [--gpu-mem 80GB]

Prints parameters, FLOPs per token, per-GPU memory by part, whether it fits, the largest micro
batch that fits, and step time and time to the recipe's tokens at an assumed MFU.

The model is the one training will build: the recipe's model.vocab_size, else the vocabulary of
the prepared dataset (<data.root>/<data.dataset>/meta.json), else the size of the recipe's
data.tokenizer (byte 257, gpt2 50257); failing all three (a char dataset not yet prepared) it
assumes GPT-2's 50257 and says so on its first line. --vocab-size overrides the dataset's.

--device cpu plans CPU processes instead: memory per process, and all processes on one machine
(or --gpus-per-node of them) against this machine's RAM (or --gpu-mem). No throughput: a CPU has
no peak FLOP/s to scale by an MFU, so time a few steps of scaling.train instead.

Memory per rank (bytes), P parameters, s sequence length, b micro batch, h width, L layers,
V vocabulary, t tensor-parallel degree, d the FSDP shard degree:
- parameters, gradients, AdamW m and v: 4 bytes each per parameter (fp32 master weights; bf16
  compute comes from FSDP's mixed precision), divided by d x t (d is 1 under DDP);
- communication buffers: FSDP gathers a block's bf16 (or fp32) parameters for the block being
  computed and the one prefetched (all L blocks when they keep them: d = 1 or
  reshard_after_forward off), holds its unsharded gradients and a reduce-scatter input;
  the root (embeddings, LM head) stays gathered from forward to backward;
- gradient accumulation with several data-parallel ranks: gradients are reduced once per step,
  so between micro batches every parameter's unsharded fp32 gradient is held, 4P/t; HSDP
  reduce-scatters inside its shard group every micro batch and holds its shard, 4P/(d t);
- activations (Korthikanti et al. 2022, attention through SDPA so no s^2 term): per layer
  34*s*b*h bytes in 16-bit (x2 in fp32), / t with sequence parallelism, (10 + 24/t)*s*b*h
  without; a fully checkpointed layer keeps only its input (2*s*b*h) and one layer is live while
  recomputed; backward adds one MLP's hidden gradients (16*s*b*h); plus the logits and the loss,
  b*s*V*12 bytes eager (the logits, their fp32 copy, log-softmax and its gradient), b*s*V*2 (bf16)
  or *4 (fp32) compiled (scaling.bench head measures both), / t with loss parallelism;
- runtime: the CUDA context and allocator slack (1.5 GB), or on CPU the footprint of a fresh
  Python process with the training code loaded (measured when planning).

Traffic per rank per optimizer step (bytes sent, ring collectives: an all-gather or
reduce-scatter of B bytes over n ranks sends (n-1)/n x B from each, an all-reduce twice that),
d = dp_shard, r = dp_replicate, k = micro batches per step, g = 2 bytes (bf16 gathers) or 4:
- FSDP all-gathers every micro batch: each block in forward and again in backward (once with
  reshard_after_forward off), the root once: k (n-1)/n g (2 L block + root) / t, over d ranks;
- one reduce-scatter of the fp32 gradients per step (HSDP: per micro batch, k): (d-1)/d 4P/t;
- HSDP: one all-reduce of the gradient shard across the r replicas: 2 (r-1)/r 4P/(d t).
The mesh is (dp_replicate, dp_shard, tp), tp innermost: a group stays on a node's NVLink when
it spans no more ranks than a node has GPUs (d t for the shard group, r d t for the replicas),
otherwise its traffic crosses the inter-node link. Tensor parallelism's activation traffic is
not counted. tests/test_plan.py checks these bytes against the collectives of real FSDP(2) and
HSDP(2x2) runs.

--measure builds the model on the meta device under the recipe's real parallel plan, once per
rank over torch's fake process group, and reports the parameter elements each rank actually
holds, so the sharding term is checked against real sharding rather than trusted.
"""

import argparse
import functools
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from scaling.config import Config, ConfigError, die, load_config, model_config
from scaling.data import load_meta
from scaling.model import GPT, gpt_config
from scaling.tokenizer import ByteTokenizer, GPT2Tokenizer

GPUS = {"a100": (312e12, 80), "h100": (989e12, 80), "h200": (989e12, 141), "a10g": (125e12, 24),
        "l4": (121e12, 24), "b200": (2250e12, 192)}
CUDA_RUNTIME_GB = 1.5
GB = 1e9
TOKENIZER_VOCAB = {"byte": ByteTokenizer.vocab_size, "gpt2": GPT2Tokenizer.vocab_size}  # char: its dataset's alphabet


@dataclass
class Shape:
    P: int  # parameters, tied embedding counted once
    L: int
    h: int
    V: int
    s: int
    block: int  # parameters of one block
    root: int  # parameters outside the blocks (embeddings, final norm)
    flops_per_token: int


def shape_of(cfg: Config, vocab_size: int) -> Shape:
    import torch
    m = cfg.model
    with torch.device("meta"):
        model = GPT(gpt_config(n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd, block_size=m.block_size,
                               vocab_size=m.vocab_size or vocab_size, bias=m.bias))
    block = sum(p.numel() for p in model.blocks[0].parameters())
    P = model.num_params()
    return Shape(P=P, L=m.n_layer, h=m.n_embd, V=model.cfg.vocab_size, s=cfg.train.seq_len, block=block,
                 root=P - m.n_layer * block, flops_per_token=model.flops_per_token(cfg.train.seq_len, min(vocab_size, model.cfg.vocab_size)))


def resharded(p) -> bool:
    """Whether blocks free their gathered parameters after forward: never with a shard degree
    of 1, where there is nothing to free (apply_fsdp keeps them)."""
    return p.reshard_after_forward and p.dp_shard > 1


def memory(cfg: Config, sh: Shape, b: int, device: str) -> dict:
    """Bytes per rank, by part, for micro batch b."""
    p, t = cfg.parallel, cfg.parallel.tp
    shard = p.dp_shard * t  # FSDP2 wraps every layout; DDP is its shard degree of 1
    out = {"parameters": 4 * sh.P / shard, "gradients": 4 * sh.P / shard, "optimizer": 8 * sh.P / shard}
    # FSDP's gathered copies: 2 blocks of parameters (current + prefetched) and one block's
    # unsharded gradients and reduce-scatter input; the root is kept gathered. bf16 is FSDP's
    # mixed precision on CPUs and GPUs alike: parameters are gathered in bf16.
    # With a shard degree of 1 (or reshard_after_forward off) blocks keep their gathered
    # parameters from forward to backward: all L of them are held (apply_fsdp).
    gathered = 2 if cfg.train.dtype == "bf16" else 4
    held = 2 if resharded(p) else sh.L
    out["comm_buffers"] = (held * gathered + gathered + 4) * sh.block / t + (gathered + 4) * sh.root / t
    # Gradient accumulation over several data-parallel ranks reduces once per step: between
    # micro batches FSDP2 holds every parameter's unsharded gradient in fp32. HSDP reduce-scatters
    # inside its shard group every micro batch and holds sharded fp32 gradients instead.
    dp = p.dp_replicate * p.dp_shard
    if dp > 1 and cfg.train.global_batch_size > cfg.train.micro_batch_size * dp:
        out["accumulated_grads"] = 4 * sh.P / t / (p.dp_shard if p.dp_replicate > 1 else 1)
    act_bytes = 1 if cfg.train.dtype == "bf16" else 2  # Korthikanti's figures are for 16-bit
    sbh = sh.s * b * sh.h
    full = (34 / t if p.sequence_parallel or t == 1 else 10 + 24 / t) * sbh * act_bytes
    ckpt = 2 * sbh * act_bytes
    ac = p.activation_checkpoint
    n_ckpt = sh.L if ac == "full" else (math.ceil(sh.L / p.ac_every) if ac == "selective" else 0)
    layers = n_ckpt * ckpt + (sh.L - n_ckpt) * full + (full if n_ckpt else 0)
    # Backward's working set on top of what is saved: the gradients of one MLP's 4h-wide hidden
    # activations and of its GELU input, 2 x 4h per token.
    layers += 16 * sbh * act_bytes / t
    vocab_split = t if p.loss_parallel else 1
    # The logits and the loss (model.head_loss). Eager: the logits, their fp32 copy, log-softmax
    # and its gradient, ~12 bytes per logit in fp32 and bf16 alike. Compiled (parallelize), the
    # upcast and the softmax fuse into passes over the logits and their gradient reuses their
    # buffer: one logit's bytes. `python -m scaling.bench head` measures them on a CPU at 124M's
    # shape (docs/benchmarks.md): eager 12.1 / 12.1, compiled 4.1 / 2.1 (fp32 / bf16).
    compiled = cfg.parallel.compile if cfg.parallel.compile is not None else device == "cuda"
    per_logit = (2 if cfg.train.dtype == "bf16" else 4) if compiled else 12
    logits = b * sh.s * sh.V * per_logit / vocab_split
    out["activations"] = layers + logits
    out["runtime"] = CUDA_RUNTIME_GB * GB if device == "cuda" else process_rss()
    return out


def traffic(cfg: Config, sh: Shape, gpus_per_node: int) -> dict:
    """Bytes one rank sends per optimizer step in FSDP2's collectives, by link (the docstring's
    formula): {"inter_node": ..., "intra_node": ...}."""
    p, t = cfg.parallel, cfg.parallel.tp
    d, r = p.dp_shard, p.dp_replicate
    k = max(1, cfg.train.global_batch_size // (cfg.train.micro_batch_size * d * r))
    g = 2 if cfg.train.dtype == "bf16" else 4
    gathered = ((2 if resharded(p) else 1) * sh.L * sh.block + sh.root) / t
    scatters = k if r > 1 and d > 1 else 1  # HSDP reduce-scatters every micro batch
    shard = (d - 1) / d * (k * g * gathered + scatters * 4 * sh.P / t)
    replicate = 2 * (r - 1) / r * 4 * sh.P / (d * t)
    out = {"inter_node": 0.0, "intra_node": 0.0}
    out["intra_node" if d * t <= gpus_per_node else "inter_node"] += shard
    out["intra_node" if r * d * t <= gpus_per_node else "inter_node"] += replicate
    return out


@functools.lru_cache(maxsize=1)
def process_rss() -> float:
    """RSS of a fresh Python process that has loaded the training code (and with it torch)."""
    import subprocess
    code = ("import scaling.train, os; f = open('/proc/self/statm'); "
            "print(int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE'))")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def dataset_vocab(cfg: Config) -> tuple[int, str | None]:
    """The tokenizer's vocabulary as training will find it, without preparing anything: the
    prepared dataset's, else the recipe's tokenizer's; else GPT-2's, with a note saying so."""
    d = Path(cfg.data.root) / cfg.data.dataset
    if (d / "meta.json").is_file():
        return load_meta(d)["vocab_size"], None
    if cfg.data.tokenizer in TOKENIZER_VOCAB:
        return TOKENIZER_VOCAB[cfg.data.tokenizer], None
    return GPT2Tokenizer.vocab_size, (f"assuming GPT-2's vocabulary of 50,257 tokens: dataset '{cfg.data.dataset}' "
                                      f"is not prepared at {d} (prepare it, or pass --vocab-size)")


def ram_bytes() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def largest_micro_batch(cfg, sh, device, capacity) -> int:
    fixed = sum(memory(cfg, sh, 0, device).values())
    per_b = sum(memory(cfg, sh, 1, device).values()) - fixed
    return max(0, int((capacity - fixed) // per_b))


def plan(cfg: Config, gpus: int, gpu: str | None, gpu_mem_gb: float | None, mfu: float | None, device: str,
         vocab_size: int | None = None, gpus_per_node: int | None = None) -> dict:
    """vocab_size: the tokenizer's (None: the dataset's, see dataset_vocab). On CPU, gpu and mfu
    are not used, and gpus_per_node (default: all processes) is processes per machine."""
    note = None
    if vocab_size is None:
        vocab_size, note = dataset_vocab(cfg)
    sh = shape_of(cfg, vocab_size)
    t = cfg.train
    mem = memory(cfg, sh, t.micro_batch_size, device)
    total = sum(mem.values())
    tokens_per_step = t.global_batch_size * t.seq_len
    r = {"parameters": sh.P, "flops_per_token": sh.flops_per_token, "vocab_size": vocab_size, "vocab_note": note,
         "memory": mem, "total": total, "tokens_per_step": tokens_per_step, "run_tokens": tokens_per_step * t.max_steps}
    if device == "cpu":
        # Processes on one machine share its RAM; a CPU has no peak FLOP/s to take an MFU of.
        per_machine = min(gpus, gpus_per_node or gpus)
        capacity = gpu_mem_gb * GB if gpu_mem_gb else ram_bytes()
        r.update(capacity=capacity, fits=total * per_machine <= capacity, per_machine=per_machine,
                 largest_micro_batch=largest_micro_batch(cfg, sh, device, capacity / per_machine),
                 step_s=None, tokens_per_sec=None, run_s=None, traffic=traffic(cfg, sh, per_machine),
                 gpus_per_node=per_machine)
        return r
    gpus_per_node = gpus_per_node or 8
    peak, default_mem = GPUS[gpu]
    capacity = (gpu_mem_gb or default_mem) * GB
    step_s = tokens_per_step * sh.flops_per_token / (gpus * peak * mfu)
    r.update(capacity=capacity, fits=total <= capacity,
             largest_micro_batch=largest_micro_batch(cfg, sh, device, capacity),
             step_s=step_s, tokens_per_sec=tokens_per_step / step_s, run_s=step_s * t.max_steps,
             traffic=traffic(cfg, sh, gpus_per_node), gpus_per_node=gpus_per_node)
    return r


def load_for_world(recipe: str, gpus: int, overrides=()) -> Config:
    """The recipe resolved as if launched on `gpus` ranks."""
    return load_config(recipe, list(overrides), world=gpus)


def billions(n: int) -> str:
    """104.9e9 -> '104.9B'; a small run in millions instead of '0.0B'."""
    return f"{n / 1e9:.1f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def report(cfg: Config, r: dict, gpus: int, gpu: str | None, mfu: float | None, device: str) -> str:
    p, cpu = cfg.parallel, device == "cpu"
    lines = [r["vocab_note"]] if r["vocab_note"] else []  # first: every figure below rests on it
    lines.append(f"{cfg.name}: {r['parameters']:,} parameters, {r['flops_per_token'] / 1e9:.2f} GFLOPs/token, "
                 f"{f'{gpus} CPU processes' if cpu else f'{gpus} x {gpu}'} (dp_replicate={p.dp_replicate}, "
                 f"dp_shard={p.dp_shard}, tp={p.tp}, activation_checkpoint={p.activation_checkpoint})")
    lines.append(f"per {'process' if cpu else 'rank'}, micro batch {cfg.train.micro_batch_size} x {cfg.train.seq_len} tokens:")
    for k, v in r["memory"].items():
        lines.append(f"  {k:17} {v / GB:8.2f} GB")
    verdict = f"{'fits' if r['fits'] else 'DOES NOT FIT'}; largest micro batch that fits: {r['largest_micro_batch']}"
    if cpu:
        lines.append(f"  {'total':17} {r['total'] / GB:8.2f} GB; {r['per_machine']} processes per machine: "
                     f"{r['per_machine'] * r['total'] / GB:.2f} GB of {r['capacity'] / GB:.1f} GB RAM: {verdict}")
        lines.append(f"throughput: not planned on CPU (it has no peak FLOP/s to scale; time a few steps instead): "
                     f"{r['tokens_per_step']:,} tokens per step, {cfg.train.max_steps:,} steps "
                     f"({billions(r['run_tokens'])} tokens)")
    else:
        lines.append(f"  {'total':17} {r['total'] / GB:8.2f} GB of {r['capacity'] / GB:.0f} GB: {verdict}")
        lines.append(f"at {mfu:.0%} MFU: {r['tokens_per_sec']:,.0f} tokens/s, {r['step_s']:.2f} s per step of "
                     f"{r['tokens_per_step']:,} tokens, {duration(r['run_s'])} for {cfg.train.max_steps:,} steps "
                     f"({billions(r['run_tokens'])} tokens)")
    tr = r["traffic"]
    lines.append(f"FSDP traffic per rank per step: {tr['inter_node'] / GB:.2f} GB over the inter-node link, "
                 f"{tr['intra_node'] / GB:.2f} GB within a node ({r['gpus_per_node']} "
                 f"{'processes' if cpu else 'GPUs'} per node)")
    return "\n".join(lines)


def measure(cfg: Config, gpus: int, vocab_size: int = 50257) -> list[int]:
    """Parameter elements each rank holds under the recipe's real parallel plan: the model is built
    on the meta device and parallelized once per rank, in this process, over torch's fake process
    group (collectives do nothing, shapes and shards are real), so no memory and no GPU is needed."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from scaling.parallel import ParallelDims, build_mesh, parallelize
    p = cfg.parallel
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp)
    counts = []
    for rank in range(gpus):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=gpus)
        try:
            mesh, _ = build_mesh(dims, "cpu")
            with torch.device("meta"):
                model = GPT(model_config(cfg, vocab_size))
            parallelize(model, dims, mesh, p, torch.device("cpu"), cfg.train.dtype)
            counts.append(sum((q.to_local() if hasattr(q, "to_local") else q).numel() for q in model.parameters()))
        finally:
            dist.destroy_process_group()
    return counts


def parse_gb(text: str) -> float:
    try:
        gb = float(text.strip().upper().removesuffix("B").removesuffix("G"))
    except ValueError:
        gb = 0
    if not 0 < gb < math.inf:  # nan fails this too
        raise ValueError(f"--gpu-mem: expected a size like 80GB, got {text!r}")
    return gb


def check_args(a):
    """The numbers plan() divides by and counts with; argparse checks only their types."""
    for opt, value in (("--gpus", a.gpus), ("--vocab-size", a.vocab_size), ("--gpus-per-node", a.gpus_per_node)):
        if value is not None and value < 1:
            raise ValueError(f"{opt}: must be >= 1, got {value}")
    if a.mfu is not None and not 0 < a.mfu <= 1:
        raise ValueError(f"--mfu: must be in (0, 1] (a fraction of peak), got {a.mfu}")
    for opt, value in (("--gpu", a.gpu), ("--mfu", a.mfu)):
        if a.device == "cpu" and value is not None:
            raise ValueError(f"{opt}: plans a GPU, but --device cpu plans CPU processes")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m scaling.plan", description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--gpus", type=int, required=True, help="world size (GPUs, or CPU processes)")
    ap.add_argument("--gpu", choices=list(GPUS), help="default: h100")
    ap.add_argument("--gpu-mem", help="memory per GPU, e.g. 80GB (default: the GPU's); with --device cpu, "
                                      "the machine's (default: this machine's RAM)")
    ap.add_argument("--mfu", type=float, help="assumed model FLOPs utilisation (default: 0.4)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: plan CPU processes (memory against RAM, no throughput)")
    ap.add_argument("--vocab-size", type=int, help="the tokenizer's (default: the prepared dataset's)")
    ap.add_argument("--gpus-per-node", type=int, help="which collectives stay on a node's NVLink "
                                                      "(default: 8; with --device cpu, all processes)")
    ap.add_argument("--measure", action="store_true", help="also count each rank's real shard (CPU processes)")
    ap.error = die  # one line, like every bad input, not argparse's usage block
    a, a.overrides = ap.parse_known_args(argv)  # the rest: --section.key=value overrides
    try:
        check_args(a)
        if a.device == "cuda":
            a.gpu, a.mfu = a.gpu or "h100", a.mfu or 0.4
        cfg = load_for_world(a.recipe, a.gpus, a.overrides)
        r = plan(cfg, a.gpus, a.gpu, parse_gb(a.gpu_mem) if a.gpu_mem else None, a.mfu, a.device, a.vocab_size,
                 a.gpus_per_node)
    except (ConfigError, ValueError) as e:  # a DataError (a broken meta.json) is a ValueError
        die(str(e))
    print(report(cfg, r, a.gpus, a.gpu, a.mfu, a.device))
    if a.measure:
        cfg.parallel.compile = False
        counts = measure(cfg, a.gpus, r["vocab_size"])
        predicted = r["memory"]["parameters"] / 4
        print("measured parameter elements per rank: " + ", ".join(f"{c:,}" for c in counts)
              + f" (planned {predicted:,.0f}; largest off by {max(abs(c / predicted - 1) for c in counts):.2%})")


if __name__ == "__main__":
    main()

"""GPT-2: one model definition for every size and every parallel layout.

Faithful to OpenAI's GPT-2 (learned positions, pre-LayerNorm, GELU MLP, tied embedding and
LM head) with two choices made for the parallelism layer:
- q, k and v are three separate nn.Linear layers, so tensor parallelism can shard each of
  them column-wise and every rank holds whole heads (a fused qkv would split q from k and v);
- the attention reads its head count off the projected tensor, not the config, so the same
  code runs with all heads or with a shard of them.
"""

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# name -> (n_layer, n_head, n_embd). The first four are GPT-2's; the rest are for CPUs.
SIZES = {
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
    "baby": (6, 6, 384),  # nanoGPT's shakespeare_char model
    "nano": (4, 4, 128),
    "tiny": (2, 2, 64),
}


@dataclass
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50257
    dropout: float = 0.0
    bias: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.head_dim = cfg.n_embd // cfg.n_head
        self.q = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.k = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.v = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        # Shapes come from q, not x: under sequence parallelism x holds a slice of the
        # sequence while q holds all of it, and under tensor parallelism a slice of the heads.
        B, T, _ = q.shape
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        # GPT-2 used the tanh approximation of GELU; keep it for exact parity with its weights.
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0, "n_embd must be divisible by n_head"
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self):
        # One tensor serves as input embedding and output projection (GPT-2 does this). Building
        # on the meta device and materialising with to_empty() breaks the tie: call this again.
        self.lm_head.weight = self.wte.weight

    # Under sequence parallelism (parallel/tp.py sets it to the TP degree) every sequence given
    # to forward() must split evenly over the TP ranks.
    seq_multiple = 1

    def forward(self, idx, targets=None, pos=None, at: int | None = None):
        """idx: (B, T) token ids -> logits (B, T, vocab_size), or with targets (B, T) the mean
        next-token loss. pos: the positions of the T tokens, arange(T) unless given (generate()
        gives them for its padding). at: the logits of that position only, (B, 1, vocab_size)."""
        T = idx.shape[1]
        if pos is None:
            if T > self.cfg.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {self.cfg.block_size}")
            pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        if targets is not None:
            return self.head_loss(x, targets)
        x = self.ln_f(x)
        return self.lm_head(x if at is None else x[:, at:at + 1])

    def head_loss(self, x, targets):
        """Final norm, LM head and cross-entropy: the step's largest tensors (B x T x vocab
        logits) live here. parallelize() compiles it as one graph, as it does each block, so the
        fp32 upcast, log-softmax and its gradient fuse into a few passes over the bf16 logits
        instead of materialising fp32 copies of them (nanoGPT compiles its loss the same way)."""
        return loss_fn(self.lm_head(self.ln_f(x)), targets)

    @torch.no_grad()
    def init_weights(self, seed: int = 0):
        """GPT-2 initialisation, drawn per parameter from a generator seeded by (seed, name).

        Because no draw depends on the order or the placement of other parameters, the same seed
        gives the same weights whatever the model is split into: a rank holding a shard of a
        parameter draws the whole parameter and keeps its part (see parallel/). The draws happen
        on the parameters' device (on a GPU: no host-to-device copy of the whole model per rank),
        so weights are identical across layouts on one device type; a CPU and a GPU draw
        differently (compare them from one saved initial state).
        """
        std = 0.02
        resid_std = std / math.sqrt(2 * self.cfg.n_layer)  # GPT-2: scale residual projections
        for name, p in self.named_parameters():
            dev = p.device
            if name.endswith("bias"):
                fill_param(p, torch.zeros(p.shape, device=dev))
            elif p.dim() == 1:  # LayerNorm weights
                fill_param(p, torch.ones(p.shape, device=dev))
            else:
                s = resid_std if name.endswith("proj.weight") else std
                g = torch.Generator(device=dev).manual_seed(param_seed(seed, name))
                fill_param(p, torch.normal(0.0, s, p.shape, generator=g, device=dev))

    def num_params(self) -> int:
        """Parameter count, the tied embedding / LM head counted once."""
        return sum(p.numel() for p in self.parameters())  # parameters() de-duplicates the tie

    def flops_per_token(self, seq_len: int, vocab_size: int | None = None) -> int:
        """Training FLOPs per token, forward + backward (PaLM appendix B): 6N + 12*L*H*Q*T.

        N leaves out the position embedding (a lookup) but keeps the tied token embedding once,
        because it is also the LM head's matrix multiply; the second term is attention.
        vocab_size: the tokenizer's. Rows padded beyond it (for fast kernels) are computed but
        do no useful work, so they are not counted: padding cannot raise the MFU.
        """
        padding = (self.cfg.vocab_size - vocab_size) * self.cfg.n_embd if vocab_size else 0
        n = self.num_params() - self.wpe.weight.numel() - padding
        c = self.cfg
        return 6 * n + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * seq_len

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, vocab_size: int | None = None):
        """Sample max_new_tokens after idx (B, T). temperature 0 means greedy. vocab_size: the
        tokenizer's; ids at or above it (a vocabulary padded for fast kernels) are never drawn."""
        for _ in range(max_new_tokens):
            ctx = idx[:, -self.cfg.block_size:]
            T = ctx.shape[1]
            # Pad the context on the right to a length sequence parallelism can split. Causal
            # attention keeps padding from changing the logits at real positions, so the text is
            # the same under every layout; padding past block_size reuses the last position.
            pad = -T % self.seq_multiple
            pos = torch.arange(T + pad, device=idx.device).clamp_(max=self.cfg.block_size - 1)
            logits = self(F.pad(ctx, (0, pad)), pos=pos, at=T - 1)[:, 0, :]
            if hasattr(logits, "full_tensor"):  # vocabulary-sharded under tensor parallelism
                logits = logits.full_tensor()
            logits = logits.float()
            if vocab_size is not None:
                logits[:, vocab_size:] = float("-inf")
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.size(-1):
                    kth = torch.topk(logits, top_k).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat((idx, nxt), dim=1)
        return idx


def param_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, parameter name), stable across processes and Python runs."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def fill_param(p: torch.Tensor, full: torch.Tensor):
    """Copy a full-size tensor (on p's device) into p, which may be a plain tensor or a DTensor shard."""
    if hasattr(p, "device_mesh"):  # DTensor: keep only this rank's part of the full tensor
        from torch.distributed.tensor import distribute_tensor
        full = distribute_tensor(full.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)
        p.to_local().copy_(full.to_local())
    else:
        p.copy_(full)


def gpt_config(size: str | None = None, **overrides) -> GPTConfig:
    """GPTConfig from a size name (see SIZES) with any field overridden."""
    fields = {}
    if size is not None:
        fields.update(zip(("n_layer", "n_head", "n_embd"), SIZES[size]))
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return GPTConfig(**fields)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every position of every sequence, in fp32 whatever
    the logits' dtype (bf16 under mixed precision)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

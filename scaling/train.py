"""Train a GPT-2: python -m scaling.train RECIPE [--section.key=value ...]

train() in order: process group and device -> dataset (the embedded one is prepared on first
use) -> checkpoint to resume from -> mesh -> loader -> model (meta, parallelized, materialised,
initialised) -> optimizer -> resume or init_from -> loop (accumulate micro batches, clip, check
for NaN, step, log, evaluate, checkpoint, stop on a signal) -> wait for the last save -> sample.
"""

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from scaling import checkpoint, distributed
from scaling.checkpoint import CheckpointError
from scaling.config import Config, ConfigError, die, main_with_config, to_dict
from scaling.data import DataError, TokenWindows, load_meta
from scaling.loader import DataLoader
from scaling.metrics import Metrics, Profiler, StepTimer, memory, peak_flops
from scaling.model import GPT, GPTConfig, gpt_config, param_seed
from scaling.optim import build_optimizer, lr_at
from scaling.parallel import ParallelDims, build_mesh, dp_rank, parallelize
from scaling.prepare import prepare_embedded
from scaling.rundir import check_fits, open_run
from scaling.tokenizer import get_tokenizer

USAGE = "python -m scaling.train RECIPE [--section.key=value ...]"
# Fault injection, for testing train.on_nonfinite end to end: this step's loss becomes NaN.
INJECT_NONFINITE_STEP = int(os.environ.get("SCALING_INJECT_NONFINITE_STEP", "0"))


def dataset_dir(cfg: Config) -> Path:
    """The dataset's folder; the embedded corpus is prepared here on first use."""
    d = Path(cfg.data.root) / cfg.data.dataset
    if not (d / "meta.json").is_file():
        if cfg.data.dataset != "embedded":
            raise DataError(f"dataset '{cfg.data.dataset}' is not prepared at {d}: "
                            f"run python data/{cfg.data.dataset}/prepare.py")
        print(f"preparing the embedded corpus in {d} ...", flush=True)
        prepare_embedded(d)
    return d


def model_config(cfg: Config, vocab_size: int) -> GPTConfig:
    m = cfg.model
    return gpt_config(n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd, block_size=m.block_size,
                      vocab_size=m.vocab_size or vocab_size, dropout=m.dropout, bias=m.bias)


def check_vocab(cfg: Config, meta: dict):
    if cfg.data.tokenizer is not None and cfg.data.tokenizer != meta["tokenizer"]:
        raise DataError(f"data.tokenizer: recipe expects '{cfg.data.tokenizer}' but dataset "
                        f"'{cfg.data.dataset}' was prepared with '{meta['tokenizer']}'")
    v = cfg.model.vocab_size
    if v is not None and v < meta["vocab_size"]:
        raise DataError(f"model.vocab_size: {v} is smaller than the dataset's vocabulary "
                        f"({meta['tokenizer']}, {meta['vocab_size']} tokens)")


def loss_fn(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate(model, windows: TokenWindows, cfg: Config, device, loss_ctx=contextlib.nullcontext) -> float:
    """Mean loss over the first eval_sequences windows of the validation split: the same
    sequences at every evaluation, whatever the micro batch size or the layout (each rank
    evaluates all of them), so values are comparable across steps and across runs."""
    model.eval()
    n = min(cfg.train.eval_sequences, windows.num_windows)
    total = torch.zeros((), device=device)
    for first in range(0, n, cfg.train.micro_batch_size):
        rows = np.stack([windows.window(w) for w in range(first, min(first + cfg.train.micro_batch_size, n))])
        xy = torch.from_numpy(rows.astype(np.int64)).to(device)
        with loss_ctx():
            total += local_value(loss_fn(model(xy[:, :-1]), xy[:, 1:])).float() * len(rows)
    model.train()
    return (total / n).item()


def build_model(cfg: Config, vocab_size: int, dims: ParallelDims, mesh, device) -> GPT:
    """The GPT, split over the mesh without ever existing whole on one rank: built on the meta
    device (no memory), parallelized, then materialised shard by shard and initialised."""
    with torch.device("meta"):
        model = GPT(model_config(cfg, vocab_size))
    parallelize(model, dims, mesh, cfg.parallel, device, cfg.train.dtype)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty() gives the LM head its own (empty) tensor again
    model.init_weights(cfg.train.seed)  # per-parameter seeds: identical weights under any layout
    return model


def seed_dropout(seed: int, dims: ParallelDims, mesh, dp_mesh, sequence_parallel: bool):
    """Seed the process's RNG, which draws the dropout masks, so that ranks holding the same
    activations draw the same masks and ranks holding different ones draw different masks.

    Data-parallel ranks hold different sequences: different seeds. Tensor-parallel ranks of one
    data-parallel rank hold the same residual stream unless sequence parallelism splits it by
    position, so without it they share a seed (else "replicated" LayerNorm weights would get
    different gradients and drift apart); with it every rank differs. Attention dropout acts on
    each rank's own heads; without sequence parallelism the TP ranks' heads then see the same
    mask pattern (head h and head h + n_head/tp), a correlation between heads, not a bias.
    """
    tp_rank = mesh["tp"].get_local_rank() if dims.tp > 1 and sequence_parallel else 0
    torch.manual_seed(param_seed(seed, f"dropout:dp{dp_rank(dp_mesh)}:tp{tp_rank}"))


def load_pretrained(model, cfg: Config, log):
    """Overwrite the fresh weights with model.init_from's (fine-tuning). Every rank reads the file
    and keeps its own shard of each tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from scaling.convert import pad_vocab, read_weights
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


def local_value(x: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (loss, grad norm under TP/FSDP) as a plain tensor."""
    return x.full_tensor() if isinstance(x, DTensor) else x


class Preempted(Exception):
    pass


class NonFinite(Exception):
    pass


class SpikeGuard:
    """Skips an update whose gradient norm is a spike: more than `zscore` standard deviations
    above the mean of the last `window` accepted steps' norms (llm.c added such a guard after a
    spike derailed its 1.5B run). Off when zscore is 0; it needs the norm on the host, one sync
    per step. Its history is part of the checkpoint, so a resumed run decides as the whole would."""

    MIN_HISTORY = 10  # no verdict on fewer norms than this (e.g. the first steps of a run)

    def __init__(self, zscore: float, window: int):
        self.zscore, self.window, self.norms, self.skipped = zscore, window, [], 0

    def _stats(self) -> tuple[float, float]:
        mean = sum(self.norms) / len(self.norms)
        return mean, (sum((x - mean) ** 2 for x in self.norms) / len(self.norms)) ** 0.5

    def describe(self) -> str:
        mean, std = self._stats()
        return f"recent mean {mean:.4g}, std {std:.3g}, train.spike_zscore={self.zscore:g}"

    def is_spike(self, x: float) -> bool:
        if not self.zscore:
            return False
        if len(self.norms) >= min(self.MIN_HISTORY, self.window):
            mean, std = self._stats()
            if x > mean + self.zscore * max(std, 1e-6 * mean):
                self.skipped += 1
                return True
        self.norms = (self.norms + [x])[-self.window:]
        return False

    def state_dict(self) -> dict:  # a string: DCP saves it as one object, whatever its length
        return {"guard": json.dumps({"norms": self.norms, "skipped": self.skipped})}

    def load_state_dict(self, state: dict):
        s = json.loads(state["guard"])
        self.norms, self.skipped = s["norms"][-self.window:], s["skipped"]


class NonFiniteSteps:
    """Finds steps whose gradient norm is NaN/inf without a host sync per step. check() runs on
    the device and gives the optimizer's found_inf flag (the update is skipped there); report()
    reads the count only where the host waits anyway (log and checkpoint steps). Under
    on_nonfinite=stop it then ends the run before any save: the updates since the bad step were
    skipped or came after it, and none of them reaches a checkpoint."""

    def __init__(self, device, mode: str, log):
        self.mode, self.log, self.total = mode, log, 0
        self.count = torch.zeros((), dtype=torch.int64, device=device)  # since the last report
        self.first = torch.zeros((), dtype=torch.int64, device=device)  # its first bad step, or 0

    def check(self, grad_norm: torch.Tensor, step: int) -> torch.Tensor:
        bad = ~torch.isfinite(grad_norm)
        self.first = torch.where((self.count == 0) & bad, step, self.first)
        self.count += bad
        return bad.float()

    def report(self, ckpt, metrics):
        n, first = torch.stack([self.count, self.first]).tolist()
        if not n:
            return
        self.count.zero_(), self.first.zero_()
        if self.mode == "stop":
            ckpt.wait()  # the save in flight holds the last good step: commit it first
            metrics.close()
            raise NonFinite(f"non-finite gradient norm at step {first}: stopping; the checkpoints are "
                            f"untouched (train.on_nonfinite=skip skips such batches)")
        self.total += n
        more = f" and {n - 1} more since" if n > 1 else ""
        self.log(f"step {first}{more}: non-finite gradient norm, update skipped ({self.total} so far)", flush=True)


def clip_gradients(model, max_norm: float) -> torch.Tensor:
    """Clip to max_norm (0: no clipping) and return the total norm, reduced over ranks once."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = local_value(torch.nn.utils.get_total_norm([p.grad for p in params]))
    if max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def train_state(model, optimizer, loader, guard: SpikeGuard, step: int, tokens: int) -> dict:
    """Everything a checkpoint holds besides RNG states, config and tokenizer (checkpoint.py)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd, "data": loader.state_dict(),
            "train": {"step": step, "tokens": tokens, **guard.state_dict()}}


def resume_from(ckpt: checkpoint.Checkpointer, path: Path, model, optimizer, loader, guard: SpikeGuard,
                log) -> tuple[int, int]:
    state = train_state(model, optimizer, loader, guard, 0, 0)
    same_rng = ckpt.load(path, state)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    loader.load_state_dict(state["data"])
    guard.load_state_dict(state["train"])
    step, tokens = int(state["train"]["step"]), int(state["train"]["tokens"])
    log(f"resumed from {path} at step {step}" + ("" if same_rng else
        " (another world size: dropout RNG streams restart from the seed)"), flush=True)
    return step, tokens


def train(cfg: Config) -> dict:
    """Run the recipe; returns the last logged metrics record (on every rank)."""
    t, p = cfg.train, cfg.parallel
    # NCCL's flight recorder (on through launch/nccl_env.sh) dumps into the run folder when a
    # collective times out; these are read when the process group is created.
    for var in ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"):
        os.environ.setdefault(var, str(Path(cfg.logging.run_dir).resolve() / "nccl_trace_rank_"))
    env = distributed.init(t.device, p.timeout_s)
    device = env.device
    log = print if env.is_main else (lambda *a, **k: None)
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp)
    if p.compile is None:
        p.compile = device.type == "cuda"  # on CPU compile costs a minute and runs slower
    if device.type == "cuda" and cfg.logging.oom_snapshot:
        torch.cuda.memory._record_memory_history(max_entries=100_000)
    if env.is_main:
        data_dir = dataset_dir(cfg)  # may prepare the embedded corpus: one rank does it
    distributed.barrier()
    data_dir = dataset_dir(cfg)
    meta = load_meta(data_dir)
    check_vocab(cfg, meta)
    cfg.model.vocab_size = cfg.model.vocab_size or meta["vocab_size"]  # recorded in config.yaml
    tokenizer_spec = {k: meta[k] for k in ("tokenizer", "vocab_size", "eot", "chars") if k in meta}
    tokenizer_spec["name"] = tokenizer_spec.pop("tokenizer")
    tok = None  # only sampling needs it (GPT-2's BPE files may not be reachable from a GPU node)
    if cfg.logging.sample_tokens:  # a bad prompt or missing BPE files found now, not after training
        tok = get_tokenizer(tokenizer_spec["name"], tokenizer_spec)
        check_prompt(tok, cfg.logging.sample_prompt)
    # Rank 0 verifies checkpoints, checks the run folder and claims it; every rank follows.
    resume, run_id = distributed.on_rank0(lambda: open_run(cfg, tokenizer_spec["name"], report=log))
    # Rank 0 reads the whole checkpoint to verify it while every rank builds the model.
    verification = checkpoint.Verification(resume if env.is_main else None, cfg.checkpoint.verify)
    run_dir = Path(cfg.logging.run_dir)
    mesh, dp_mesh = build_mesh(dims, device.type)
    seed_dropout(t.seed, dims, mesh, dp_mesh, p.sequence_parallel)  # weights and data order have their own streams

    train_loader = DataLoader(TokenWindows(data_dir, "train", t.seq_len), t.micro_batch_size,
                              t.global_batch_size, dp_rank=dp_rank(dp_mesh), dp_size=dims.dp, seed=t.seed,
                              device=device, workers=cfg.data.workers, prefetch_steps=cfg.data.prefetch_steps)
    val_windows = TokenWindows(data_dir, "val", t.seq_len) if t.eval_every else None

    model = build_model(cfg, meta["vocab_size"], dims, mesh, device)
    optimizer = build_optimizer(model, cfg.optim)
    # Under TP with loss parallelism the logits stay split over the vocabulary into the loss.
    loss_ctx = loss_parallel if dims.tp > 1 and p.loss_parallel else contextlib.nullcontext
    # With several data-parallel ranks, reduce gradients once per step, after the last micro
    # batch; alone, reduce every micro batch (a copy) rather than hold an unsharded fp32 copy.
    syncs = dims.dp > 1
    guard = SpikeGuard(t.spike_zscore, t.spike_window)
    ckpt = checkpoint.Checkpointer(cfg, tokenizer_spec, run_id or checkpoint.new_run_id())
    if resume:
        resume = distributed.on_rank0(lambda: verification.confirm(
            lambda p: check_fits(p, cfg, tokenizer_spec["name"], log), report=log))
    if resume:
        start, tokens = resume_from(ckpt, resume, model, optimizer, train_loader, guard, log)
    else:
        start, tokens = 0, 0
        if cfg.model.init_from:
            load_pretrained(model, cfg, log)
    stop = distributed.StopSignal()

    flops_per_token = model.flops_per_token(t.seq_len, meta["vocab_size"])
    peak = peak_flops(device)
    tokens_per_step = t.global_batch_size * t.seq_len
    log(f"model: {model.num_params():,} parameters, {flops_per_token / 1e6:.1f} MFLOPs/token | "
        f"{tokens_per_step:,} tokens/step | {dims.describe()} | device {device} | dtype {t.dtype} | "
        f"run_dir {run_dir}", flush=True)

    metrics = Metrics(run_dir, enabled=env.is_main, wandb_cfg=cfg.logging if cfg.logging.wandb else None,
                      config=to_dict(cfg))
    profiler = Profiler(cfg.logging.profile_steps, run_dir, env.rank)
    last = {}
    loss_sum = torch.zeros((), device=device)  # summed on device: no host sync per step
    if val_windows and start == 0:  # the starting point, for comparison
        metrics.log({"step": 0, "val_loss": evaluate(model, val_windows, cfg, device, loss_ctx),
                     "tokens": 0, "elapsed_s": metrics.elapsed()})
    t_log, steps_since_log, save_block_s = time.perf_counter(), 0, None
    timer = StepTimer(device, ("data", "compute", "optim"))
    nonfinite = NonFiniteSteps(device, t.on_nonfinite, log)
    for step in range(start, t.max_steps):
        profiler.step(step)
        lr = lr_at(step, cfg.optim, t.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        timer.start()
        micro_batches = train_loader.next_step()
        timer.mark("data")
        for i, (x, y) in enumerate(micro_batches):
            if syncs:
                model.set_requires_gradient_sync(i == len(micro_batches) - 1)
            with loss_ctx():
                # Every micro batch holds the same number of tokens, so the mean of the
                # per-micro-batch means (over micro batches here, over ranks in the gradient
                # reduction) is the mean over the global batch's tokens.
                loss = loss_fn(model(x), y) / len(micro_batches)
                if step + 1 == INJECT_NONFINITE_STEP:
                    loss = loss * float("nan")
                loss.backward()
            loss_sum += local_value(loss.detach())
        timer.mark("compute")
        grad_norm = clip_gradients(model, t.grad_clip)
        # A NaN/inf (loss or any gradient) must never reach the weights: the fused AdamW skips
        # the update on the device when found_inf is set (as under GradScaler), no host sync.
        skip = nonfinite.check(grad_norm, step + 1)
        if guard.zscore and math.isfinite(norm := grad_norm.item()) and guard.is_spike(norm):
            log(f"step {step + 1}: gradient norm {norm:.4g} is a spike ({guard.describe()}), "
                f"update skipped ({guard.skipped} so far)", flush=True)
            skip = torch.ones_like(skip)
        optimizer.found_inf = skip
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timer.mark("optim")
        steps_since_log += 1
        done, tokens = step + 1, tokens + tokens_per_step

        if done % cfg.logging.every == 0 or done == t.max_steps:
            loss_avg = distributed.all_reduce_mean(loss_sum / steps_since_log).item()
            now = time.perf_counter()
            tok_s = steps_since_log * tokens_per_step / (now - t_log)
            nonfinite.report(ckpt, metrics)
            last = {"step": done, "loss": loss_avg, "lr": lr, "grad_norm": grad_norm.item(),
                    "tokens_per_sec": tok_s, "tokens_per_sec_per_device": tok_s / env.world_size,
                    "mfu": tok_s / env.world_size * flops_per_token / peak if peak else None,
                    **{f"{k}_ms": v / steps_since_log for k, v in timer.read_ms().items()},
                    **memory(device), "skipped_steps": nonfinite.total, "spike_skips": guard.skipped, "tokens": tokens,
                    "elapsed_s": metrics.elapsed()}
            if save_block_s is not None:  # how long the last save held up training (async: staging only)
                last["save_block_s"], save_block_s = save_block_s, None
            metrics.log(last)
            loss_sum.zero_()
            t_log, steps_since_log = time.perf_counter(), 0
        if val_windows and (done % t.eval_every == 0 or done == t.max_steps):
            t_eval = time.perf_counter()
            val_loss = evaluate(model, val_windows, cfg, device, loss_ctx)
            metrics.log({"step": done, "val_loss": val_loss, "tokens": tokens, "elapsed_s": metrics.elapsed()})
            last["val_loss"] = val_loss
            t_log += time.perf_counter() - t_eval  # keep evaluation out of the throughput figure
        every = cfg.checkpoint.every
        stopping = stop.agreed(done)
        t_save = time.perf_counter()
        if (every and done % every == 0) or done == t.max_steps or stopping:
            nonfinite.report(ckpt, metrics)  # under train.on_nonfinite=stop, never save past a NaN
            ckpt.save(done, train_state(model, optimizer, train_loader, guard, done, tokens))
            save_block_s = time.perf_counter() - t_save
        ckpt.poll()
        t_log += time.perf_counter() - t_save
        if stopping:
            ckpt.wait()
            log(f"{stop.received or 'stop signal on another rank'}: saved step {done}, exiting with "
                f"code {distributed.EXIT_PREEMPTED} (run the same command to resume)", flush=True)
            metrics.close()
            raise Preempted()
    profiler.close()
    train_loader.close()
    ckpt.wait()
    ckpt.close()
    if cfg.logging.sample_tokens:
        # Every rank runs the sampling (the sharded model needs all of them); rank 0 prints.
        text = sample_text(model, tok, cfg.logging.sample_prompt, cfg.logging.sample_tokens,
                           cfg.logging.sample_temperature, seed=t.seed, device=device)
        log("sample:\n" + text, flush=True)
    metrics.close()
    return last


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


def main(argv=None):
    cfg = main_with_config(sys.argv[1:] if argv is None else argv, USAGE)
    try:
        train(cfg)
    except distributed.FollowerExit as e:  # rank 0 printed why
        sys.exit(e.code)
    except (DataError, ConfigError, CheckpointError, ConnectionError) as e:  # ConnectionError: no BPE files
        die(str(e))
    except OSError as e:  # the run folder became unwritable or full while training
        die(f"{e.filename or cfg.logging.run_dir}: {(e.strerror or str(e)).lower()}; the checkpoints saved "
            "before are intact")
    except RuntimeError as e:
        if "DataLoader worker" in str(e):  # killed (out of memory?) or failed: torch says which pid
            die(f"rank {distributed.rank()}: the data loader's worker process failed ({str(e).splitlines()[0][:200]}); "
                "the newest complete checkpoint is intact", code=1)
        if not distributed.is_comm_failure(e):
            raise
        # Another rank died or hangs (a collective failed or timed out). Exit now: waiting for
        # background threads stuck on the same ranks would only delay the scheduler's restart.
        print(f"error: rank {distributed.rank()}: a collective failed ({str(e).splitlines()[0][:200]}): another "
              "rank died or hung past parallel.timeout_s; the newest complete checkpoint is intact",
              file=sys.stderr, flush=True)
        os._exit(1)
    except Preempted:
        sys.exit(distributed.EXIT_PREEMPTED)
    except NonFinite as e:
        die(str(e), code=3)
    except torch.OutOfMemoryError:
        if torch.cuda.is_available() and cfg.logging.oom_snapshot:
            path = Path(cfg.logging.run_dir) / f"oom_snapshot_rank{distributed.rank()}.pickle"
            torch.cuda.memory._dump_snapshot(str(path))
            print(f"out of memory: allocation history in {path} (open it at pytorch.org/memory_viz)",
                  file=sys.stderr)
        raise
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()

"""Train a GPT-2: python -m scaling.train RECIPE [--section.key=value ...]

Read from the bottom up: train() is the loop. build() makes the run in order (process group and
device -> dataset, the embedded one prepared on first use -> checkpoint to resume from -> mesh ->
loader -> model: meta, parallelized, materialised, initialised -> optimizer -> resume or
init_from -> metrics); train_step() is one optimizer step (micro batches forward/backward, clip,
keep a non-finite or spiking step out of the weights, update); log_window(), validate(), save()
and preempted() are what happens after a step; finish() waits for the last save and samples.
"""

import os
import signal

INTERRUPTED = "error: interrupted: nothing was saved by this command (the checkpoints saved before are intact)"


def _interrupted(signum, frame):
    if os.environ.get("RANK", "0") == "0":
        os.write(2, (INTERRUPTED + "\n").encode())
    os._exit(130)


if __name__ == "__main__":  # Ctrl-C in the seconds of imports and set-up before the loop takes SIGINT over
    signal.signal(signal.SIGINT, _interrupted)

import contextlib
import gc
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.tensor.parallel import loss_parallel

from scaling import checkpoint, distributed
from scaling.checkpoint import CheckpointError, resume_from, train_state
from scaling.config import Config, ConfigError, die, main_with_config, model_config, to_dict
from scaling.data import DataError, TokenWindows, load_meta, tokenizer_spec
from scaling.eval import mean_loss
from scaling.guards import NonFinite, NonFiniteSteps, SpikeGuard
from scaling.loader import DataLoader, worker_death
from scaling.metrics import Metrics, Profiler, StepTimer, check_wandb, duration, memory, peak_flops, read_metrics
from scaling.model import GPT
from scaling.optim import build_optimizer, clip_gradients, lr_at
from scaling.parallel import ParallelDims, build_mesh, dp_rank, local_value, parallelize, seed_dropout
from scaling.prepare import dataset_dir
from scaling.rundir import RunFinished, check_fits, open_run
from scaling.sample import check_prompt, sample_text
from scaling.tokenizer import get_tokenizer
from scaling.weights import load_pretrained

USAGE = "python -m scaling.train RECIPE [--section.key=value ...]"
# Fault injection, for testing train.on_nonfinite end to end: this step's loss becomes NaN.
INJECT_NONFINITE_STEP = int(os.environ.get("SCALING_INJECT_NONFINITE_STEP", "0"))


def check_vocab(cfg: Config, meta: dict):
    """The recipe's tokenizer and vocabulary against the dataset's."""
    if cfg.data.tokenizer is not None and cfg.data.tokenizer != meta["tokenizer"]:
        raise DataError(f"data.tokenizer: recipe expects '{cfg.data.tokenizer}' but dataset "
                        f"'{cfg.data.dataset}' was prepared with '{meta['tokenizer']}'")
    v = cfg.model.vocab_size
    if v is not None and v < meta["vocab_size"]:
        raise DataError(f"model.vocab_size: {v} is smaller than the dataset's vocabulary "
                        f"({meta['tokenizer']}, {meta['vocab_size']} tokens)")


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


class Preempted(Exception):
    """A stop signal ended the run after saving its step: exit for a requeue."""


def start_process(cfg: Config) -> distributed.Env:
    """The process group and device, and what must be set before them."""
    # NCCL's flight recorder (on through launch/nccl_env.sh) dumps into the run folder when a
    # collective times out; these are read when the process group is created.
    for var in ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"):
        os.environ.setdefault(var, str(Path(cfg.logging.run_dir).resolve() / "nccl_trace_rank_"))
    env = distributed.init(cfg.train.device, cfg.parallel.timeout_s, cfg.train.tf32)
    if cfg.parallel.compile is None:
        cfg.parallel.compile = env.device.type == "cuda"  # on CPU compile costs a minute and runs slower
    if env.device.type == "cuda" and cfg.logging.oom_snapshot:
        torch.cuda.memory._record_memory_history(max_entries=100_000)
    return env


def open_dataset(cfg: Config, env: distributed.Env) -> tuple[Path, dict, dict, object]:
    """The dataset's folder, meta.json, the tokenizer as the checkpoint records it, and the
    tokenizer itself when the run ends with a sample (None otherwise)."""
    if env.is_main:
        dataset_dir(cfg)  # may prepare the embedded corpus: one rank does it
    distributed.barrier()
    data_dir = dataset_dir(cfg)
    meta = load_meta(data_dir)
    check_vocab(cfg, meta)
    cfg.model.vocab_size = cfg.model.vocab_size or meta["vocab_size"]  # recorded in config.yaml
    spec = tokenizer_spec(meta)
    tok = None  # only sampling needs it (GPT-2's BPE files may not be reachable from a GPU node)
    if cfg.logging.sample_tokens:  # a bad prompt or missing BPE files found now, not after training
        tok = get_tokenizer(spec["name"], spec)
        check_prompt(tok, cfg.logging.sample_prompt)
    return data_dir, meta, spec, tok


@dataclass
class Run:
    """One training run: what build() makes, and the counters the loop moves on."""
    cfg: Config
    env: distributed.Env
    log: Callable
    dims: ParallelDims
    tok: object  # for the closing sample, or None
    loader: DataLoader
    val_windows: TokenWindows | None
    model: GPT
    optimizer: torch.optim.Optimizer
    loss_ctx: Callable  # TP's loss parallelism, or nothing
    guard: SpikeGuard
    nonfinite: NonFiniteSteps
    ckpt: checkpoint.Checkpointer
    stop: distributed.StopSignal
    metrics: Metrics
    timer: StepTimer
    flops_per_token: float
    data_dir: Path = None
    step: int = 0  # optimizer steps done
    tokens: int = 0  # tokens trained on
    start: tuple = (0, 0)  # (step, tokens) where this command began
    loss_sum: torch.Tensor = None  # summed on the device over the log window: no host sync per step
    window_steps: int = 0  # steps in the log window
    window_start: float = 0.0  # when the log window began (evaluation and saves excluded)
    save_block_s: float | None = None  # how long the last save held up training
    steady: tuple | None = None  # (time, step) at the end of the first log window: the ETA's origin
    last: dict = field(default_factory=dict)  # the last logged record
    dp_group: object = None  # the data-parallel ranks (validation splits its windows over them)


def build(cfg: Config) -> Run:
    """Process group -> dataset -> checkpoint to resume from -> mesh -> loader -> model (meta,
    parallelized, materialised, initialised) -> optimizer -> resume or init_from -> metrics."""
    t, p = cfg.train, cfg.parallel
    env = start_process(cfg)
    device, log = env.device, print if env.is_main else (lambda *a, **k: None)
    if cfg.logging.wandb:  # before the dataset, the run folder and the model
        distributed.on_rank0(lambda: check_wandb(cfg.logging))
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp)
    data_dir, meta, tokenizer_spec, tok = open_dataset(cfg, env)
    # Rank 0 verifies checkpoints, checks the run folder and claims it; every rank follows.
    resume, run_id = distributed.on_rank0(lambda: open_run(cfg, tokenizer_spec, report=log))
    # Rank 0 reads the whole checkpoint to verify it while every rank builds the model.
    verification = checkpoint.Verification(resume if env.is_main else None, cfg.checkpoint.verify)
    mesh, dp_mesh = build_mesh(dims, device.type, p.timeout_s)
    seed_dropout(t.seed, dims, mesh, dp_mesh, p.sequence_parallel)  # weights and data order have their own streams
    loader = DataLoader(TokenWindows(data_dir, "train", t.seq_len), t.micro_batch_size, t.global_batch_size,
                        dp_rank=dp_rank(dp_mesh), dp_size=dims.dp, seed=t.seed, device=device,
                        workers=cfg.data.workers, prefetch_steps=cfg.data.prefetch_steps)
    model = build_model(cfg, meta["vocab_size"], dims, mesh, device)
    optimizer, guard = build_optimizer(model, cfg.optim), SpikeGuard(t.spike_zscore, t.spike_window)
    ckpt = checkpoint.Checkpointer(cfg, tokenizer_spec, run_id or checkpoint.new_run_id())
    if resume:
        resume = distributed.on_rank0(lambda: verification.confirm(
            lambda p: check_fits(p, cfg, tokenizer_spec, log), report=log))
    step, tokens = resume_from(ckpt, resume, model, optimizer, loader, guard, log) if resume else (0, 0)
    if not resume and cfg.model.init_from:
        load_pretrained(model, cfg, log)
    flops_per_token = model.flops_per_token(t.seq_len, meta["vocab_size"])
    log(f"model: {model.num_params():,} parameters, {flops_per_token / 1e6:.1f} MFLOPs/token | "
        f"{t.global_batch_size * t.seq_len:,} tokens/step | {dims.describe()} | device {device} | "
        f"dtype {t.dtype} | run_dir {cfg.logging.run_dir}", flush=True)
    run = Run(cfg, env, log, dims, tok, loader, TokenWindows(data_dir, "val", t.seq_len) if t.eval_every else None,
               model, optimizer, loss_parallel if dims.tp > 1 and p.loss_parallel else contextlib.nullcontext,
               guard, NonFiniteSteps(device, t.on_nonfinite, log), ckpt, distributed.StopSignal(),
               Metrics(Path(cfg.logging.run_dir), enabled=env.is_main, config=to_dict(cfg),
                       wandb_cfg=cfg.logging if cfg.logging.wandb else None),
               StepTimer(device, ("data", "compute", "optim")), flops_per_token, data_dir, step, tokens,
               (step, tokens), loss_sum=torch.zeros((), device=device),
               dp_group=dp_mesh.get_group() if dims.dp > 1 else None)
    if resume and env.is_main and (change := checkpoint.world_size_change(resume, cfg)):  # open_run said it
        run.metrics.event({"step": step, "event": "world_size", **change, "elapsed_s": run.metrics.elapsed()})
    return run


def train_step(run: Run, step: int) -> tuple[torch.Tensor, float]:
    """One optimizer step: forward/backward over this rank's micro batches, clip, keep a
    non-finite or spiking step out of the weights, update. Returns (gradient norm, lr)."""
    model, optimizer, t = run.model, run.optimizer, run.cfg.train
    lr = lr_at(step, run.cfg.optim, t.max_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    run.timer.start()
    micro_batches = run.loader.next_step()
    run.timer.mark("data")
    for i, (x, y) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # With several data-parallel ranks, reduce gradients once per step, after the last micro
        # batch; alone, reduce every micro batch (a copy) rather than hold an unsharded fp32 copy.
        # HSDP reduce-scatters inside its shard group (a node) every micro batch, keeping sharded
        # fp32 gradients instead of unsharded ones, and all-reduces across replicas once.
        if run.dims.fsdp and run.dims.dp_replicate > 1:
            model.set_requires_all_reduce(last)
        elif run.dims.dp > 1:
            model.set_requires_gradient_sync(last)
        with run.loss_ctx():
            # Every micro batch holds the same number of tokens, so the mean of the
            # per-micro-batch means (over micro batches here, over ranks in the gradient
            # reduction) is the mean over the global batch's tokens.
            loss = model(x, y) / len(micro_batches)
            if step + 1 == INJECT_NONFINITE_STEP:
                loss = loss * float("nan")
            loss.backward()
        run.loss_sum += local_value(loss.detach())
    run.timer.mark("compute")
    grad_norm = clip_gradients(model, t.grad_clip)
    # A NaN/inf (loss or any gradient) must never reach the weights: the fused AdamW skips
    # the update on the device when found_inf is set (as under GradScaler), no host sync.
    skip = run.nonfinite.check(grad_norm, step + 1)
    guard = run.guard
    if guard.zscore and math.isfinite(norm := grad_norm.item()) and guard.is_spike(norm):
        run.log(f"step {step + 1}: gradient norm {norm:.4g} is a spike ({guard.describe()}), "
                f"update skipped ({guard.skipped} so far)", flush=True)
        skip = torch.ones_like(skip)
    optimizer.found_inf = skip
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    run.timer.mark("optim")
    return grad_norm, lr


def log_window(run: Run, lr: float, grad_norm: torch.Tensor):
    """The metrics of the steps since the last log line: mean loss over ranks, throughput,
    MFU, where the step's time went, memory, skipped updates."""
    t, steps, world = run.cfg.train, run.window_steps, run.env.world_size
    tokens_per_step = t.global_batch_size * t.seq_len
    loss_avg = distributed.all_reduce_mean(run.loss_sum / steps).item()
    now = time.perf_counter()
    step_s = (now - run.window_start) / steps
    tok_s = tokens_per_step / step_s
    # The first window after a start or resume holds compilation and warm-up: it is marked and
    # kept out of the ETA, which comes from the wall time since (evaluations and saves included).
    warmup, eta = run.steady is None, None
    if warmup:
        run.steady = (now, run.step)
    elif run.step > run.steady[1]:
        eta = (t.max_steps - run.step) * (now - run.steady[0]) / (run.step - run.steady[1])
    peak = peak_flops(run.env.device)
    run.nonfinite.report(run.ckpt, run.metrics)
    run.last = {"step": run.step, "max_steps": t.max_steps, "loss": loss_avg, "lr": lr,
                "grad_norm": grad_norm.item(), "ms_per_step": 1e3 * step_s, "tokens_per_sec": tok_s, "tokens_per_sec_per_device": tok_s / world,
                "mfu": tok_s / world * run.flops_per_token / peak if peak else None,
                **{f"{k}_ms": v / steps for k, v in run.timer.read_ms().items()},
                **memory(run.env.device), "skipped_steps": run.nonfinite.total, "spike_skips": run.guard.skipped,
                "tokens": run.tokens, "elapsed_s": run.metrics.elapsed(), "eta_s": eta, "warmup": warmup}
    if run.save_block_s is not None:  # how long the last save held up training (async: staging only)
        run.last["save_block_s"], run.save_block_s = run.save_block_s, None
    run.metrics.log(run.last)
    run.loss_sum.zero_()
    run.window_start, run.window_steps = time.perf_counter(), 0


def validate(run: Run):
    """Validation loss at this step, kept out of the throughput figure."""
    t_eval = time.perf_counter()
    t = run.cfg.train
    val_loss = mean_loss(run.model, run.val_windows, min(t.eval_sequences, run.val_windows.num_windows),
                         t.micro_batch_size, run.env.device, run.loss_ctx, run.dp_group)
    run.metrics.log({"step": run.step, "max_steps": t.max_steps, "val_loss": val_loss, "tokens": run.tokens,
                     "elapsed_s": run.metrics.elapsed()})
    run.last["val_loss"] = val_loss
    run.window_start += time.perf_counter() - t_eval


def save(run: Run, due: bool):
    """Save this step when due (async: training waits for the staging only), and commit or
    clean up earlier saves; both kept out of the throughput figure."""
    t_save = time.perf_counter()
    if due:
        run.nonfinite.report(run.ckpt, run.metrics)  # under train.on_nonfinite=stop, never save past a NaN
        run.ckpt.save(run.step, train_state(run.model, run.optimizer, run.loader, run.guard, run.step, run.tokens))
        run.save_block_s = time.perf_counter() - t_save
    run.ckpt.poll()
    run.window_start += time.perf_counter() - t_save


def preempted(run: Run):
    """A stop signal reached some rank: the step is saved; wait for its commit, then exit."""
    run.ckpt.wait()
    code = run.stop.code
    run.log(f"{run.stop.received or 'stop signal on another rank'}: saved step {run.step}, exiting with "
            f"code {code} (run the same command to resume)", flush=True)
    run.metrics.close()
    raise Preempted(code)


def finish(run: Run) -> dict:
    """Wait for the last save, sample from the model, close the metrics."""
    cfg = run.cfg
    run.loader.close()
    run.ckpt.wait()
    run.ckpt.close()
    if cfg.logging.sample_tokens:
        # Every rank runs the sampling (the sharded model needs all of them); rank 0 prints.
        text = sample_text(run.model, run.tok, cfg.logging.sample_prompt, cfg.logging.sample_tokens,
                           cfg.logging.sample_temperature, seed=cfg.train.seed, device=run.env.device)
        run.log("sample:\n" + text, flush=True)
    if run.env.is_main:
        run.log(summary(run), flush=True)
    run.metrics.close()
    return run.last


def summary(run: Run) -> str:
    """What the run did and holds, and what to do with it next: the closing lines."""
    cfg, path = run.cfg, run.metrics.path
    steps, tokens = run.step - run.start[0], run.tokens - run.start[1]
    lines = [f"done: step {run.step}/{cfg.train.max_steps}, {_count(run.tokens)} tokens in {duration(run.metrics.elapsed())}"
             + (f" (this command: {steps} steps, {_count(tokens)} tokens in {duration(run.metrics.session())})"
                if run.start[0] else "")]
    evals = {r["step"]: r["val_loss"] for r in read_metrics(path) if r.get("val_loss") is not None}  # the last per step
    if evals:
        last, best = max(evals), min(evals, key=evals.get)
        lines.append(f"validation loss: {evals[last]:.4f} at step {last} (best {evals[best]:.4f} at step {best})")
    folder = checkpoint.newest_complete(cfg.logging.run_dir, report=lambda *_: None, verify=False)
    d = cfg.logging.run_dir
    lines += [f"newest checkpoint: {folder}",
              f"  sample:   python -m scaling.sample {d}",
              f"  evaluate: python -m scaling.eval {d} loss --data {run.data_dir}",
              f"  export:   python -m scaling.convert {d} out/{cfg.name} --to hf"]
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


@contextlib.contextmanager
def collect_every(steps: int):
    """Python's automatic garbage collection off (the loop collects every `steps` steps, on every
    rank at once: automatic collections pause ranks at different moments, and the others wait for
    them in the next collective); back on afterwards for in-process callers."""
    collecting = gc.isenabled()
    if steps:
        gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def train(cfg: Config) -> dict:
    """Run the recipe; returns the last logged metrics record (on every rank)."""
    with collect_every(cfg.train.gc_every):
        return loop(cfg, build(cfg))


def loop(cfg: Config, run: Run) -> dict:
    """Steps from run.step to train.max_steps with logging, validation, saves and stop signals."""
    t = cfg.train
    try:
        profiler = Profiler(cfg.logging.profile_steps, Path(cfg.logging.run_dir), run.env.rank)
        if run.val_windows and run.step == 0:  # the starting point, for comparison
            validate(run)
        run.window_start = time.perf_counter()
        for step in range(run.step, t.max_steps):
            profiler.step(step)
            grad_norm, lr = train_step(run, step)
            run.step, run.tokens = step + 1, run.tokens + t.global_batch_size * t.seq_len
            run.window_steps += 1
            if t.gc_every and run.step % t.gc_every == 0:
                gc.collect(1)  # the young generations: milliseconds; a full collection can take a second
            last_step = run.step == t.max_steps
            if run.step % cfg.logging.every == 0 or last_step:
                log_window(run, lr, grad_norm)
            if run.val_windows and (run.step % t.eval_every == 0 or last_step):
                validate(run)
            stopping = run.stop.agreed(run.step)
            every = cfg.checkpoint.every
            save(run, due=(every and run.step % every == 0) or last_step or stopping)
            if stopping:
                preempted(run)
        profiler.close()
        return finish(run)
    finally:
        run.stop.restore()  # in-process callers (notebooks, tests) get their signal handlers back


def main(argv=None):
    cfg = main_with_config(sys.argv[1:] if argv is None else argv, USAGE)
    try:
        train(cfg)
    except distributed.FollowerExit as e:  # rank 0 printed why
        sys.exit(e.code)
    except RunFinished as e:  # not an error: said on stdout, exit 0
        print(e, flush=True)
    except CheckpointError as e:  # a save that failed, or no whole checkpoint left: the disk's failure
        die(str(e), code=1)
    except (DataError, ConfigError, ConnectionError) as e:  # ConnectionError: no BPE files
        die(str(e))  # every rank that finds it says it: a node may lack what rank 0's node has
    except OSError as e:  # the run folder became unwritable or full while training
        die(f"{e.filename or cfg.logging.run_dir}: {(e.strerror or str(e)).lower()}; the checkpoints saved "
            "before are intact", code=1)  # a failure of the disk, not bad input
    except RuntimeError as e:
        if died := worker_death(e):  # killed (out of memory?): a failure, not bad input
            die(f"rank {distributed.rank()}: {died}; the newest complete checkpoint is intact", code=1)
        if not distributed.is_comm_failure(e):
            raise
        # Another rank died or hangs (a collective failed or timed out). Exit now: waiting for
        # background threads stuck on the same ranks would only delay the scheduler's restart.
        print(f"error: rank {distributed.rank()}: a collective failed ({str(e).splitlines()[0][:200]}): another "
              "rank died or hung past parallel.timeout_s; the newest complete checkpoint is intact",
              file=sys.stderr, flush=True)
        distributed.kill_stopped_siblings()
        os._exit(1)
    except Preempted as e:
        distributed.mark_preempted(e.args[0])  # before the process group goes: torchrun's SIGTERM may end us then
        sys.exit(e.args[0])
    except NonFinite as e:
        die(str(e), code=3)
    except KeyboardInterrupt:  # main() called in a process that kept Python's own SIGINT handler
        die(INTERRUPTED.removeprefix("error: "), code=distributed.EXIT_INTERRUPTED)
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

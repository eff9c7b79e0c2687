"""Benchmarks: python -m scaling.bench [throughput|layouts|prepare|loader|checkpoint|comm|head] [options]

throughput: the framework's training loop (scaling.train, everything on: schedule, clipping,
  metrics, data loader) against a plain PyTorch loop of the same model, data and optimizer, in
  one process, alternating rounds so that both see the same machine state. Each round times
  `--steps` steps after as many warm-up steps; the table gives the median round.
layouts: the demo recipe under each parallel layout (real torchrun processes), tokens/s.
prepare: GPT-2 tokenization of the embedded corpus (Python stdlib source) by the preparation
  pipeline at 1 and N workers against a plain encode_ordinary loop, and the pipeline's peak
  memory for 10M tokens and for 1B (10x the default shard size), about 2 minutes.
loader: the training loader on a synthetic 9B-token dataset (a sparse file): its start-up time and
  memory, then at the 124M shape (4 micro batches of 12 x 1024 tokens per step) with a simulated
  slow read (--read-ms per window) and compute (--compute-ms per micro batch, the host idle as
  while a GPU computes), the time each step waits for its batches with no worker and with 1 and
  2 workers reading 2 steps ahead.
checkpoint: the cost of checkpoint checksums at the 124M shape (GPT-2 small with its AdamW
  state, 1.5 GB): computing them (rank 0's background committer does it after each save), and a
  resume (process start to 'resumed from') with checkpoint.verify on and off; median of
  --rounds, files in the page cache, as on a resume right after a save.
comm: interconnect, as nccl-tests reports it: all_reduce, all_gather and reduce_scatter over
  message sizes, time, algorithm bandwidth (bytes / time) and bus bandwidth (algbw x 2(n-1)/n for
  all_reduce, x (n-1)/n for the others: the bytes each link carries). NCCL on GPUs, gloo on CPUs.
  Run it under torchrun (launch/torchrun.sh with SCALING_MODULE=scaling.bench, or
  torchrun --nproc_per_node=N -m scaling.bench comm); run alone it starts 2 local processes.
head: the memory of the LM head and the loss (the step's B x T x vocab logits), eager against
  compiled (parallelize() compiles it), fp32 and bf16, in bytes per logit at GPT-2 124M's shape.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from scaling.config import load_config, model_config
from scaling.data import TokenWindows, load_meta
from scaling.metrics import read_metrics
from scaling.model import GPT
from scaling.prepare import SHARD_TOKENS
from scaling.distributed import pick_device
from scaling.prepare import dataset_dir
from scaling.train import train

ROOT = Path(__file__).resolve().parents[1]
# nanoGPT's shakespeare_char shape: 6 layers, 6 heads, 384 wide, context 256, batch 12.
SHAPES = {
    "baby": ["--model.n_layer=6", "--model.n_head=6", "--model.n_embd=384", "--model.block_size=256", "--train.seq_len=256",
             "--train.micro_batch_size=12", "--train.global_batch_size=12", "--model.dropout=0.0"],
    "demo": [],
}


def reference_loop(cfg, steps: int, warmup: int, compile: bool = False) -> float:
    """Plain PyTorch: random windows from a token tensor, forward with the loss inside it,
    backward, clip, AdamW, bf16 by autocast (nanoGPT's way: compiled, the LM head and the loss
    are in the graph too). Returns tokens/s over the timed steps."""
    device = pick_device(cfg.train.device)
    t = cfg.train
    data_dir = dataset_dir(cfg)
    tokens = torch.from_numpy(TokenWindows(data_dir, "train", t.seq_len).files[0][:2_000_000].astype("int64"))
    model = GPT(model_config(cfg, load_meta(data_dir)["vocab_size"])).to(device)
    model.init_weights(t.seed)
    if compile:  # the whole model, nanoGPT's way (warm-up steps include the compilation)
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                            weight_decay=cfg.optim.weight_decay)
    g = torch.Generator().manual_seed(t.seed)
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        ix = torch.randint(len(tokens) - t.seq_len - 1, (t.micro_batch_size,), generator=g)
        x = torch.stack([tokens[i: i + t.seq_len] for i in ix]).to(device)
        y = torch.stack([tokens[i + 1: i + 1 + t.seq_len] for i in ix]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.dtype == "bf16"):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    loss.item()  # wait for the device before reading the clock
    return steps * t.micro_batch_size * t.seq_len / (time.perf_counter() - start)


def framework_loop(cfg, steps: int) -> float:
    """scaling.train itself for 2 x steps; the second logged interval is the timed one."""
    with tempfile.TemporaryDirectory() as run_dir:
        cfg.logging.run_dir = run_dir
        cfg.train.max_steps, cfg.logging.every, cfg.train.eval_every = 2 * steps, steps, 0
        cfg.logging.sample_tokens = 0
        return train(cfg)["tokens_per_sec"]


def throughput(recipe: str, overrides: list[str], steps: int, rounds: int, compile: bool = False) -> dict:
    ref, fw, comp = [], [], []
    for _ in range(rounds):
        ref.append(reference_loop(load_config(recipe, overrides), steps, warmup=steps))
        fw.append(framework_loop(load_config(recipe, overrides), steps))
        if compile:  # the first half of the run includes compilation; the second is timed
            comp.append(framework_loop(load_config(recipe, overrides + ["--parallel.compile=true"]), steps))
    cfg = load_config(recipe, overrides)
    return {"recipe": recipe, "overrides": overrides, "dtype": cfg.train.dtype,
            "shape": f"{cfg.model.n_layer}L/{cfg.model.n_head}H/{cfg.model.n_embd}, T={cfg.train.seq_len}, "
                     f"B={cfg.train.micro_batch_size}",
            "steps": steps, "rounds": rounds, "reference_tok_s": ref, "framework_tok_s": fw,
            "reference_median": statistics.median(ref), "framework_median": statistics.median(fw),
            "ratio": statistics.median(fw) / statistics.median(ref),
            "compiled_tok_s": comp, "compiled_median": statistics.median(comp) if comp else None,
            "compile_gain": statistics.median(comp) / statistics.median(fw) if comp else None}


LAYOUTS = {  # name: (processes, overrides)
    "single": (1, []),
    "ddp2": (2, ["--parallel.dp_replicate=2", "--parallel.dp_shard=1"]),
    "fsdp2": (2, ["--parallel.dp_shard=2"]),
    "tp2_sp": (2, ["--parallel.tp=2", "--parallel.dp_shard=1"]),
    "hsdp2x2": (4, ["--parallel.dp_replicate=2", "--parallel.dp_shard=2", "--train.micro_batch_size=8"]),
    "fsdp2_tp2": (4, ["--parallel.dp_shard=2", "--parallel.tp=2"]),
}


def layouts(recipe: str, overrides: list[str], steps: int) -> list[dict]:
    """tokens/s of the recipe under each layout, from the second half of a 2 x steps run."""
    import subprocess
    import sys
    out = []
    for name, (nproc, extra) in LAYOUTS.items():
        with tempfile.TemporaryDirectory() as run_dir:
            args = [recipe, f"--train.max_steps={2 * steps}", f"--logging.every={steps}", "--train.eval_every=0",
                    "--logging.sample_tokens=0", f"--logging.run_dir={run_dir}", "--checkpoint.resume=none",
                    *extra, *overrides]
            launch = [sys.executable, "-m", "scaling.train"] if nproc == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "scaling.train"]
            # One process gets every core; several share them one thread each.
            env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count() // nproc or 1))
            subprocess.run(launch + args, check=True, env=env, capture_output=True, cwd=ROOT)
            last = read_metrics(Path(run_dir) / "metrics.jsonl")[-1]
        out.append({"layout": name, "processes": nproc, "tokens_per_sec": last["tokens_per_sec"]})
        print(f"{name:10} {nproc} processes {last['tokens_per_sec']:10,.0f} tok/s", flush=True)
    return out


def offline_bpe():
    """Without a network, use the GPT-2 BPE files kept beside the checkout (../shared/data)."""
    shared = ROOT.parent / "shared" / "data" / "gpt2_bpe"
    if "TIKTOKEN_CACHE_DIR" not in os.environ and shared.is_dir():
        from scaling.tokenizer import fill_gpt2_cache
        os.environ["TIKTOKEN_CACHE_DIR"] = str(fill_gpt2_cache(shared, ROOT / "runs" / "tiktoken_cache"))


def prepare_speed(workers: int, rounds: int, repeat: int) -> dict:
    """Tokens/s of GPT-2 BPE over the embedded corpus `repeat` times: a plain loop vs the
    pipeline at 1 and `workers` workers, alternating in each round (so all see the same machine
    state); the median round of each. Once through, the corpus takes 0.6 s here, and starting and
    stopping the worker pool (~25 ms) is then a visible share; a real corpus takes hours."""
    import tiktoken
    offline_bpe()

    from scaling.prepare import stdlib_files, write_dataset
    from scaling.sources import listed
    from scaling.tokenizer import GPT2Tokenizer
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()] * repeat
    docs = [("val" if i % 20 == 0 else "train", t) for i, t in enumerate(texts)]
    enc = tiktoken.get_encoding("gpt2")
    n = sum(len(enc.encode_ordinary(t)) for t in texts)  # also loads the BPE before any timing
    times = {}
    for _ in range(rounds):
        t0 = time.perf_counter()
        for t in texts:
            enc.encode_ordinary(t)
        times.setdefault("plain_loop", []).append(time.perf_counter() - t0)
        for w in sorted({1, workers}):
            with tempfile.TemporaryDirectory() as d:
                t0 = time.perf_counter()
                write_dataset(d, GPT2Tokenizer(), listed(docs, "bench"), workers=w)
                times.setdefault(f"pipeline_{w}_workers", []).append(time.perf_counter() - t0)
    plain = n / statistics.median(times["plain_loop"])
    res = {"corpus_tokens": n, "corpus_repeat": repeat, "rounds": rounds}
    for k, v in times.items():
        res[f"{k}_tok_s"] = n / statistics.median(v)
        res[f"{k}_speedup_per_round"] = [round(n / x / plain, 3) for x in v]
        print(f"{k:20} {n / statistics.median(v):14,.0f} tok/s  {n / statistics.median(v) / plain:5.2f}x  "
              f"(rounds: {' '.join(f'{n / x / plain:.2f}' for x in v)})", flush=True)
    return res


PEAK_PROBE = """
import resource, sys, tempfile
from scaling.prepare import stdlib_files, write_dataset
from scaling.sources import listed
from scaling.tokenizer import GPT2Tokenizer
files, repeat, shard_tokens = stdlib_files(), int(sys.argv[1]), int(sys.argv[2])
docs = ((("val" if i % 20 == 0 else "train"), p.read_text(encoding="utf-8", errors="replace"))
        for r in range(repeat) for i, p in enumerate(files))
with tempfile.TemporaryDirectory() as d:
    meta = write_dataset(d, GPT2Tokenizer(), listed(docs, "bench"), shard_tokens=shard_tokens)
splits = meta["splits"].values()
print(sum(s["tokens"] for s in splits), sum(len(s["files"]) for s in splits),
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def prepare_memory(repeats: list[int], shard_tokens: int) -> list[dict]:
    """Peak RSS of the pipeline (main process, and the largest worker) preparing the corpus
    `repeat` times over into shards of shard_tokens, each size in its own process."""
    import subprocess
    import sys
    offline_bpe()
    out = []
    for repeat in repeats:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(repeat), str(shard_tokens)], capture_output=True,
                           text=True, check=True, cwd=ROOT)
        tokens, files, rss_kb, worker_kb = map(int, p.stdout.split())
        out.append({"corpus_tokens": tokens, "shard_tokens": shard_tokens, "files": files, "peak_rss_mb": rss_kb / 1024,
                    "worker_peak_rss_mb": worker_kb / 1024, "seconds": time.perf_counter() - t0})
        print(f"corpus {tokens:13,} tokens in {files} files: peak RSS {rss_kb / 1024:7.1f} MB, largest worker "
              f"{worker_kb / 1024:7.1f} MB ({out[-1]['seconds']:.0f} s)", flush=True)
    return out


HEAD_PROBE = """
import gc, resource, sys, torch
from scaling.model import GPT, gpt_config
mode, dtype, b, t, c, v = sys.argv[1], getattr(torch, sys.argv[2]), *map(int, sys.argv[3:])
m = GPT(gpt_config("tiny", n_layer=1, n_head=1, n_embd=c, vocab_size=v)).to(dtype)
x, y = torch.randn(b, t, c, dtype=dtype, requires_grad=True), torch.randint(0, v, (b, t))
f = torch.compile(m.head_loss, fullgraph=True) if mode == "compiled" else m.head_loss
for _ in range(2):  # the first pass compiles
    f(x, y).backward()
    x.grad = None
    m.zero_grad(set_to_none=True)
    gc.collect()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def head_memory(batches=(2, 6), seq_len: int = 1024, n_embd: int = 768, vocab: int = 50304) -> list[dict]:
    """Bytes per logit that model.head_loss (final norm, LM head, cross-entropy) holds at its
    peak, eager and compiled, fp32 and bf16, at GPT-2 124M's width and padded vocabulary: the
    slope of peak RSS between two micro batches, each in a fresh process (which cancels the
    process's own memory). What plan.py's logits term uses."""
    import subprocess
    import sys
    out = []
    for mode in ("eager", "compiled"):
        for dtype in ("float32", "bfloat16"):
            peaks = [int(subprocess.run([sys.executable, "-c", HEAD_PROBE, mode, dtype, str(b), str(seq_len),
                                         str(n_embd), str(vocab)], capture_output=True, text=True, check=True,
                                        cwd=ROOT, env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")).stdout)
                     for b in batches]
            per_logit = (peaks[1] - peaks[0]) * 1024 / ((batches[1] - batches[0]) * seq_len * vocab)
            out.append({"mode": mode, "dtype": dtype, "batches": list(batches), "peak_rss_kb": peaks,
                        "bytes_per_logit": per_logit})
            print(f"{mode:8} {dtype:8} peak RSS {peaks[0] / 2**20:5.2f} / {peaks[1] / 2**20:5.2f} GB at micro batch "
                  f"{batches[0]} / {batches[1]} x {seq_len}: {per_logit:4.1f} bytes per logit", flush=True)
    return out


class SlowWindows(TokenWindows):
    """Windows from a slow filesystem: each one takes read_ms to arrive."""

    def __init__(self, *args, read_ms: float):
        super().__init__(*args)
        self.read_ms = read_ms

    def rows(self, ws):
        time.sleep(self.read_ms * len(ws) / 1e3)
        return super().rows(ws)


def synthetic_dataset(folder: Path, tokens: int, sparse: bool) -> Path:
    """A GPT-2 dataset of `tokens` ids in one token file: zeros in a sparse file (its size, not its
    disk use) or random ids written out (read from the page cache)."""
    from scaling.data import HEADER, HEADER_BYTES, MAGIC, VERSION, write_tokens
    folder.mkdir(parents=True)
    if sparse:
        with open(folder / "train_000000.bin", "wb") as f:
            f.write(HEADER.pack(MAGIC, VERSION, 2, tokens).ljust(HEADER_BYTES, b"\0"))
            f.truncate(HEADER_BYTES + 2 * tokens)
    else:
        write_tokens(folder / "train_000000.bin", torch.randint(0, 50257, (tokens,)).numpy(), 50257)
    (folder / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "vocab_size": 50257, "splits": {
        "train": {"files": ["train_000000.bin"], "tokens": tokens}}}))
    return folder


def _kb(pid="self", keys=("VmRSS",), name="status") -> int:
    """Sum of /proc/PID/<name> fields in kB: resident memory (status: VmRSS) or a forked
    process's own pages (smaps_rollup: Private_Clean, Private_Dirty)."""
    return sum(int(line.split()[1]) for line in Path(f"/proc/{pid}/{name}").read_text().splitlines()
               if line.split(":")[0] in keys)


def loader_bench(tokens: float, read_ms: float, compute_ms: float, steps: int) -> dict:
    """Start-up on a 9B-token dataset, then the step's wait for data with and without read-ahead
    at the 124M shape (micro batches of 12 x 1024 tokens, 4 per step, 8 ranks' step on rank 0)."""
    import numpy as np
    from scaling.loader import DataLoader
    folder = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        data = synthetic_dataset(folder / "sparse", int(tokens), sparse=True)
        rss0, t0 = _kb(), time.perf_counter()
        ld = DataLoader(TokenWindows(data, "train", 1024), 12, 12 * 4 * 8, dp_size=8, seed=1337)
        ld.next_step()
        start = {"tokens": int(tokens), "windows": ld.windows.num_windows, "start_s": time.perf_counter() - t0,
                 "rank_rss_mb": (_kb() - rss0) / 1024,
                 "worker_private_mb": [_kb(w.pid, ("Private_Clean", "Private_Dirty"), "smaps_rollup") / 1024
                                       for w in ld._it._workers]}
        ld.close()
        t0 = time.perf_counter()  # what one stored permutation per epoch (the loader before) cost
        perm = np.random.Generator(np.random.PCG64([1337, 0])).permutation(start["windows"])
        start["permutation_s"], start["permutation_mb"] = time.perf_counter() - t0, perm.nbytes / 2**20
        del perm
        print(f"start-up on {start['tokens']:,} tokens ({start['windows']:,} windows of 1025): first step after "
              f"{start['start_s']:.2f} s, rank +{start['rank_rss_mb']:.1f} MB RSS, worker "
              f"{', '.join(f'{m:.1f}' for m in start['worker_private_mb'])} MB of its own; a stored permutation would take "
              f"{start['permutation_s']:.2f} s and {start['permutation_mb']:.0f} MB per epoch and process", flush=True)
        data = synthetic_dataset(folder / "cached", 50_000_000, sparse=False)  # reads cost only read_ms
        waits = []
        print(f"{'workers':>7} {'prefetch':>8} {'data wait ms/step':>18} {'step ms':>8}  (reads {read_ms} ms/window, "
              f"compute {compute_ms} ms/micro batch)", flush=True)
        for workers, prefetch in ((0, 0), (1, 2), (2, 2)):
            ld = DataLoader(SlowWindows(data, "train", 1024, read_ms=read_ms), 12, 12 * 4 * 8, dp_size=8,
                            seed=1337, workers=workers, prefetch_steps=max(prefetch, 1))
            wait, total = [], []
            for _ in range(steps):
                t0 = time.perf_counter()
                batches = ld.next_step()
                wait.append(time.perf_counter() - t0)
                time.sleep(compute_ms * len(batches) / 1e3)  # the GPU computing; the host is free
                total.append(time.perf_counter() - t0)
            ld.close()
            r = {"workers": workers, "prefetch_steps": prefetch, "data_wait_ms": 1e3 * statistics.mean(wait[2:]),
                 "step_ms": 1e3 * statistics.mean(total[2:])}
            waits.append(r)
            print(f"{workers:7} {prefetch:8} {r['data_wait_ms']:18.1f} {r['step_ms']:8.1f}", flush=True)
        return {"start": start, "read_ms": read_ms, "compute_ms": compute_ms, "steps": steps, "wait": waits}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def comm(max_mb: float, iters: int = 10) -> list[dict]:
    """Collective timings over message sizes from 4 KB to max_mb, on every rank of the world."""
    import torch.distributed as dist

    from scaling import distributed
    env = distributed.init("auto", 300)
    n, dev = env.world_size, env.device
    rows, size = [], 4096
    if env.is_main:
        print(f"{n} ranks, {dist.get_backend()} on {dev.type}\n{'op':15} {'bytes':>12} {'time_us':>10} "
              f"{'algbw GB/s':>11} {'busbw GB/s':>11}", flush=True)
    while size <= max_mb * 2**20:
        for op in distributed.BUS_FACTOR:
            r = distributed.time_collective(op, size, dev, iters)
            rows.append(r)
            if env.is_main:
                print(f"{op:15} {size:12,} {r['time_us']:10.1f} {r['algbw_gbps']:11.3f} {r['busbw_gbps']:11.3f}",
                      flush=True)
        size *= 4
    distributed.shutdown()
    return rows


def checkpoint_cost(rounds: int, size: str = "gpt2") -> dict:
    """Checkpoint checksums at the 124M shape: the parts alone (DCP save, checksums, DCP load,
    verification), then what a user waits for: a resume (process start to 'resumed from'), with
    checkpoint.verify on and off, alternating, files in the page cache."""
    import subprocess
    import sys

    from scaling.checkpoint import checkpoints, crcs, read_manifest

    run_dir = ROOT / "runs" / "bench_checkpoint"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [sys.executable, "-m", "scaling.train", str(ROOT / "recipes" / "cpu_demo.yaml"), f"--model.size={size}",
            "--model.n_layer=null", "--model.n_head=null", "--model.n_embd=null", "--model.vocab_size=50304",
            "--model.block_size=1024", "--train.seq_len=64", "--train.micro_batch_size=1",
            "--train.global_batch_size=1", "--train.eval_every=0", "--logging.sample_tokens=0",
            f"--logging.run_dir={run_dir}", "--parallel.dp_shard=1", "--checkpoint.async_save=false"]
    t0 = time.perf_counter()
    subprocess.run(args + ["--train.max_steps=1"], check=True, capture_output=True)
    ck = checkpoints(run_dir)[-1]
    size_gb = sum(f.stat().st_size for f in ck.iterdir()) / 1e9
    print(f"{size}: checkpoint {size_gb:.2f} GB written in {time.perf_counter() - t0:.1f} s (1 step)", flush=True)
    sizes = {n: r["size"] for n, r in read_manifest(ck)["files"].items()}
    times = {"checksum_s": [], "resume_s": [], "resume_verified_s": []}
    for r in range(rounds):
        t0 = time.perf_counter()
        crcs(ck, sizes)
        times["checksum_s"].append(time.perf_counter() - t0)
        for key, verify in (("resume_s", "false"), ("resume_verified_s", "true")):
            t0 = time.perf_counter()
            p = subprocess.Popen(args + ["--train.max_steps=2", f"--checkpoint.verify={verify}"], text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for line in p.stdout:
                if line.startswith("resumed from"):
                    times[key].append(time.perf_counter() - t0)
                    break
            p.kill()
            p.wait()
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in times.items()), flush=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    out = {k: statistics.median(v) for k, v in times.items()}
    out.update(size=size, checkpoint_gb=size_gb, rounds=times,
               verify_overhead=out["resume_verified_s"] / out["resume_s"] - 1)
    print(f"{size}: checkpoint {size_gb:.2f} GB | checksums alone {out['checksum_s']:.2f} s | resume (start to "
          f"'resumed from') {out['resume_s']:.2f} s, with verification {out['resume_verified_s']:.2f} s "
          f"(+{100 * out['verify_overhead']:.1f}%)", flush=True)
    return out


def environment() -> dict:
    return {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m scaling.bench", description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="?", default="throughput", choices=["throughput", "layouts", "prepare", "loader", "checkpoint",
                                                                 "comm", "head"])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "cpu_demo.yaml"))
    ap.add_argument("--shapes", default="baby,demo", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="throughput, prepare: rounds (median reported)")
    ap.add_argument("--workers", type=int, default=2, help="prepare: tokenizer processes")
    ap.add_argument("--repeat", type=int, default=4, help="prepare: times through the corpus per timing")
    # 200 times over is 1.03B GPT-2 tokens: 10x the default 100M-token shard.
    ap.add_argument("--memory-repeats", default="2,200", help="prepare: corpus sizes (times over) for peak memory")
    ap.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="prepare: shard size for the memory runs")
    ap.add_argument("--compile", action="store_true", help="throughput: also time the framework with "
                    "parallel.compile=true")
    ap.add_argument("--tokens", type=float, default=9e9, help="loader: dataset size")
    ap.add_argument("--read-ms", type=float, default=2.0, help="loader: simulated read time per window")
    ap.add_argument("--compute-ms", type=float, default=50.0, help="loader: simulated compute per micro batch")
    ap.add_argument("--max-mb", type=float, default=64, help="comm: largest message in MiB")
    ap.add_argument("--out", default=None, help="JSON results (default runs/bench_<what>.json)")
    a, a.overrides = ap.parse_known_args(argv)  # the rest: --section.key=value for every case
    if a.what == "comm" and "WORLD_SIZE" not in os.environ:  # not under torchrun: start 2 ranks
        import subprocess
        import sys
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "scaling.bench", *(argv if argv is not None else sys.argv[1:])]
        sys.exit(subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1")).returncode)
    if a.what == "comm":
        results = comm(a.max_mb)
        if int(os.environ.get("RANK", "0")) != 0:
            return
    elif a.what == "layouts":
        results = layouts(a.recipe, a.overrides, a.steps)
    elif a.what == "prepare":
        repeats = [int(r) for r in a.memory_repeats.split(",")]
        results = {"speed": prepare_speed(a.workers, a.rounds, a.repeat),
                   "memory": prepare_memory(repeats, a.shard_tokens)}
    elif a.what == "loader":
        results = loader_bench(a.tokens, a.read_ms, a.compute_ms, a.steps)
    elif a.what == "checkpoint":
        results = checkpoint_cost(a.rounds)
    elif a.what == "head":
        results = head_memory()
    else:
        results = []
        print(f"{'shape':34} {'dtype':5} {'reference tok/s':>16} {'framework tok/s':>16} {'ratio':>6}"
              + (f" {'compiled tok/s':>15} {'gain':>6}" if a.compile else ""), flush=True)
        for shape in a.shapes.split(","):
            for dtype in a.dtypes.split(","):
                r = throughput(a.recipe, SHAPES[shape] + [f"--train.dtype={dtype}"] + a.overrides, a.steps, a.rounds,
                               a.compile)
                results.append(r)
                print(f"{r['shape']:34} {dtype:5} {r['reference_median']:16,.0f} {r['framework_median']:16,.0f} "
                      f"{r['ratio']:6.3f}" + (f" {r['compiled_median']:15,.0f} {r['compile_gain']:6.3f}"
                                              if a.compile else ""), flush=True)
    out = Path(a.out or f"runs/bench_{a.what}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": environment(), a.what: results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""The GPU acceptance run: python -m scaling.gpu_check [--out DIR]  (make gpu-check)

Proves on one GPU, in minutes, what the CPU test suite cannot: CUDA numerics, the FSDP2 code
path on a one-rank NCCL mesh with bf16 mixed precision, torch.compile and async checkpoints, a
resume that continues exactly, speed against a plain PyTorch loop, the planner's memory model at
GPT-2 XL, the cost of an async save, and host syncs per step. Each part runs in its own process
(a fresh CUDA context); the results go to DIR/gpu_check.json and DIR/gpu_check.md (a table).

Without a GPU the same parts run on the CPU at small sizes wherever they can and the GPU-only
parts are marked skipped (the test suite runs it that way, so the script cannot rot). Exit 1 if a
check fails.
"""

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "cpu_demo.yaml")  # the embedded corpus: no download
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# A small model that trains in seconds on either device.
SMALL = ["--model.n_layer=4", "--model.n_head=4", "--model.n_embd=128", "--model.block_size=128",
         "--model.dropout=0.0", "--train.seq_len=128", "--train.micro_batch_size=8", "--train.global_batch_size=8",
         "--train.eval_every=0", "--logging.sample_tokens=0", "--logging.every=1", "--parallel.dp_shard=1",
         "--optim.warmup_steps=2"]
GPT2 = ["--model.size=gpt2", "--model.n_layer=null", "--model.n_head=null", "--model.n_embd=null",
        "--model.vocab_size=50304", "--model.block_size=1024", "--model.dropout=0.0", "--train.seq_len=1024",
        "--train.micro_batch_size=16", "--train.global_batch_size=16", "--train.dtype=bf16", "--parallel.dp_shard=1",
        "--train.eval_every=0", "--logging.sample_tokens=0"]
XL = [*GPT2, "--model.size=gpt2-xl"]  # later overrides win
# Tolerances stated up front. fp32: the same math on two devices in another order of sums;
# bf16: 8 mantissa bits, differences of a few 1e-3 per step compound over 10 steps.
FP32_REL, BF16_REL, MEM_REL = 1e-3, 2e-2, 0.10


def train(run_dir: Path, *args: str, check=True) -> list[dict]:
    """scaling.train on the embedded corpus in a fresh process; its metrics records."""
    from scaling.metrics import read_metrics
    p = subprocess.run([sys.executable, "-m", "scaling.train", RECIPE, f"--logging.run_dir={run_dir}", *args],
                       capture_output=True, text=True, cwd=ROOT)
    if check and p.returncode:
        raise RuntimeError(f"scaling.train {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()[-1500:]}")
    f = run_dir / "metrics.jsonl"
    return read_metrics(f) if f.is_file() else []


def losses(records, after=0):
    return [r["loss"] for r in records if "loss" in r and r["step"] > after]


def max_rel(a, b):
    assert len(a) == len(b) and a, (a, b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def row(check, value, target, ok, note=""):
    return {"check": check, "value": value, "target": target, "pass": ok, "note": note}


def skipped(check, why="no CUDA device"):
    return {"check": check, "value": None, "target": None, "pass": None, "note": f"skipped: {why}"}


def part_parity(out: Path) -> list[dict]:
    """The small model for 10 steps from one initial state (written on the CPU) on CPU and CUDA."""
    from scaling.config import load_config, model_config
    from scaling.data import load_meta
    from scaling.model import GPT
    from scaling.prepare import dataset_dir
    from scaling.weights import write_weights
    cfg = load_config(RECIPE, SMALL)
    vocab = load_meta(dataset_dir(cfg))["vocab_size"]
    model = GPT(model_config(cfg, vocab))
    model.init_weights(cfg.train.seed)
    init = out / "init.pt"
    write_weights(model.state_dict(), model.cfg, init, "pt", vocab)
    rows = []
    for dtype, tol in (("fp32", FP32_REL), ("bf16", BF16_REL)):
        runs = {dev: losses(train(out / f"parity_{dtype}_{dev}", *SMALL, f"--model.init_from={init}",
                                  "--train.max_steps=10", f"--train.dtype={dtype}", f"--train.device={dev}",
                                  "--parallel.compile=false", "--checkpoint.resume=none"))
                for dev in ("cpu", "cuda") if dev == "cpu" or CUDA}
        if not CUDA:
            rows.append(skipped(f"CUDA vs CPU losses, {dtype}, 10 steps", f"no CUDA device (CPU losses "
                                f"{runs['cpu'][0]:.4f} .. {runs['cpu'][-1]:.4f})"))
            continue
        rel = max_rel(runs["cuda"], runs["cpu"])
        rows.append(row(f"CUDA vs CPU losses, {dtype}, 10 steps", f"{rel:.2e} max relative", f"<= {tol:g}", rel <= tol,
                        f"CPU {runs['cpu'][-1]:.5f}, CUDA {runs['cuda'][-1]:.5f} at step 10"))
    return rows


def part_resume(out: Path) -> list[dict]:
    """FSDP2 over a one-rank mesh (NCCL on a GPU), bf16 mixed precision, compile (on a GPU) and
    async saves: 20 steps straight against 10, then a resume to 20."""
    args = [*SMALL, "--train.dtype=bf16", f"--train.device={DEVICE}", f"--parallel.compile={str(CUDA).lower()}",
            "--checkpoint.async_save=true", "--checkpoint.every=10", "--optim.decay_steps=18"]
    straight = losses(train(out / "straight", *args, "--train.max_steps=20", "--checkpoint.resume=none"), after=10)
    train(out / "resumed", *args, "--train.max_steps=10", "--checkpoint.resume=none")
    resumed = losses(train(out / "resumed", *args, "--train.max_steps=20"), after=10)
    rel = max_rel(resumed, straight)
    what = f"resume continues exactly ({DEVICE}, bf16, {'compile, ' if CUDA else ''}async save, FSDP2 mesh of one)"
    return [row(what, "bitwise" if resumed == straight else f"{rel:.2e} max relative", "bitwise (or <= 1e-4)",
                rel <= 1e-4, f"steps 11-20, loss {straight[-1]:.5f} at step 20")]


def part_throughput(out: Path) -> list[dict]:
    """GPT-2 124M, bf16, compiled: scaling.train against the in-repo plain loop (also compiled)."""
    if not CUDA:
        return [skipped("GPT-2 124M bf16 + compile: tokens/s, MFU, ratio to the plain loop")]
    from scaling.bench import framework_loop, reference_loop
    from scaling.config import load_config
    from scaling.metrics import peak_flops
    from scaling.model import GPT, gpt_config
    args = [*GPT2, "--parallel.compile=true", "--train.device=cuda"]
    ref = reference_loop(load_config(RECIPE, args), steps=30, warmup=15, compile=True)
    fw = framework_loop(load_config(RECIPE, args), steps=30)
    with torch.device("meta"):
        flops = GPT(gpt_config("gpt2", vocab_size=50304)).flops_per_token(1024, vocab_size=50257)
    peak = peak_flops(torch.device("cuda"))
    mfu = (lambda tok_s: f"{100 * tok_s * flops / peak:.1f}%" if peak else "-")
    return [row("GPT-2 124M bf16 + compile, B=16 x T=1024: scaling.train", f"{fw:,.0f} tok/s, MFU {mfu(fw)}", "-", True),
            row("  plain PyTorch loop (compiled, same model and batch)", f"{ref:,.0f} tok/s, MFU {mfu(ref)}", "-", True),
            row("  ratio scaling.train / plain loop", f"{fw / ref:.3f}", ">= 1.0", fw / ref >= 1.0)]


def part_xl_memory(out: Path) -> list[dict]:
    """GPT-2 XL on this one GPU at the planner's largest micro batch: planned against measured
    peak memory, and the time from process start to the first step."""
    if not CUDA:
        return [skipped("GPT-2 XL: planner's largest micro batch and peak memory vs measured")]
    from scaling.plan import load_for_world, plan
    capacity = torch.cuda.get_device_properties(0).total_memory / 1e9
    args = [*XL, "--train.device=cuda", "--parallel.compile=false"]
    b = plan(load_for_world(RECIPE, 1, args), 1, "h200", capacity, 0.4, "cuda", vocab_size=257)["largest_micro_batch"]
    args += [f"--train.micro_batch_size={b}", f"--train.global_batch_size={b}"]
    r = plan(load_for_world(RECIPE, 1, args), 1, "h200", capacity, 0.4, "cuda", vocab_size=257)
    planned = (r["total"] - r["memory"]["runtime"]) / 1e9  # tensors only: what the allocator reports
    run_dir = out / "xl"
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "scaling.train", RECIPE, f"--logging.run_dir={run_dir}", *args,
                          "--train.max_steps=100", "--logging.every=1", "--checkpoint.resume=none"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    first, tail = None, []
    for line in p.stdout:
        tail = (tail + [line])[-5:]
        if line.startswith("step 1 |"):
            first = time.perf_counter() - t0
        if line.startswith("step 4 |"):
            break
    p.kill()  # no final checkpoint: 25 GB of XL state is not what this measures
    p.wait()
    from scaling.metrics import read_metrics
    f = run_dir / "metrics.jsonl"
    records = read_metrics(f) if f.is_file() else []
    steps = [x for x in records if "loss" in x]
    if len(steps) < 4:
        return [row(f"GPT-2 XL at the planner's largest micro batch ({b})", "did not run 4 steps",
                    f"fits in {capacity:.0f} GB", False, "".join(tail).strip()[-300:])]
    measured = max(x["mem_gb"] for x in steps)
    err = measured / planned - 1
    return [row("GPT-2 XL, one GPU, bf16: planner's largest micro batch", f"{b}", f"fits in {capacity:.0f} GB", True,
                f"{steps[-1]['tokens_per_sec']:,.0f} tok/s at step 4"),
            row("  peak memory: planned vs measured (max allocated)", f"{planned:.1f} vs {measured:.1f} GB ({err:+.1%})",
                f"within {MEM_REL:.0%}", abs(err) <= MEM_REL, f"reserved {max(x['mem_reserved_gb'] for x in steps):.1f} GB"),
            row("  time from process start to the first step", f"{first:.1f} s", "-", True,
                "initialisation drawn on the GPU")]


def part_async_save(out: Path) -> list[dict]:
    """How long a checkpoint holds up training: async (copy to host memory, then written in the
    background) against a synchronous save. GPT-2 124M on a GPU, the small model on a CPU."""
    size = [*GPT2, "--parallel.compile=false"] if CUDA else SMALL
    block = {}
    for mode in ("true", "false"):
        records = train(out / f"save_async_{mode}", *size, f"--train.device={DEVICE}", "--train.max_steps=3",
                        "--checkpoint.every=2", "--logging.every=1", f"--checkpoint.async_save={mode}",
                        "--checkpoint.resume=none")
        block[mode] = next(x["save_block_s"] for x in records if "save_block_s" in x)
    what = f"checkpoint save blocking time, {'GPT-2 124M' if CUDA else 'small model'} ({DEVICE}): async vs sync"
    # Judged on a GPU only: a small model's save on a CPU is too quick for the difference to be stable.
    return [row(what, f"{block['true']:.2f} vs {block['false']:.2f} s", "async < sync",
                block["true"] < block["false"] if CUDA else True, "" if CUDA else "not judged on a CPU")]


SYNC_PROBE = """
import json, sys, warnings, torch
from scaling.config import load_config
from scaling.train import train
torch.cuda.set_sync_debug_mode("warn")
counts = {}
for n in (4, 12):  # the same log, checkpoint and end-of-run work; 8 more plain steps
    args = sys.argv[2:] + [f"--train.max_steps={n}", f"--logging.every={n}", f"--checkpoint.every={n}",
                           f"--logging.run_dir={sys.argv[1]}/{n}"]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        train(load_config(RECIPE_PATH, args))
    counts[n] = sum("synchroniz" in str(x.message) for x in w)
print(json.dumps(counts))
"""


def part_host_syncs(out: Path) -> list[dict]:
    """Host syncs per steady-state step, counted by CUDA's sync debug mode: runs of 4 and 12 steps
    with the same log, checkpoint and end-of-run work; the difference is 8 plain steps'."""
    if not CUDA:
        return [skipped("host syncs per step (torch.cuda.set_sync_debug_mode)",
                        "no CUDA device (on CPU, tests/test_train.py counts host reads instead)")]
    code = SYNC_PROBE.replace("RECIPE_PATH", repr(RECIPE))
    p = subprocess.run([sys.executable, "-c", code, str(out / "syncs"), *SMALL, "--train.device=cuda",
                        "--train.dtype=bf16", "--parallel.compile=false", "--checkpoint.resume=none"],
                       capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        raise RuntimeError(p.stderr.strip()[-1500:])
    counts = json.loads(p.stdout.strip().splitlines()[-1])
    per_step = (counts["12"] - counts["4"]) / 8
    return [row("host syncs per training step (outside log, eval, checkpoint steps)", f"{per_step:g}", "0",
                per_step == 0, f"{counts['4']} in a 4-step run, {counts['12']} in a 12-step run (all at their ends)")]


PARTS = {"parity": part_parity, "resume": part_resume, "throughput": part_throughput, "xl_memory": part_xl_memory,
         "async_save": part_async_save, "host_syncs": part_host_syncs}


def environment() -> dict:
    return {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if CUDA else "cpu (GPU parts skipped)",
            "cuda": torch.version.cuda, "python": sys.version.split()[0]}


def table(env: dict, rows: list[dict]) -> str:
    mark = {True: "pass", False: "FAIL", None: "-"}
    lines = [f"GPU acceptance run, {env['date']}: {env['device']}, torch {env['torch']} (CUDA {env['cuda']})", "",
             "| check | measured | target | result | note |", "|---|---|---|---|---|"]
    lines += [f"| {r['check']} | {r['value'] if r['value'] is not None else '-'} | {r['target'] or '-'} | "
              f"{mark[r['pass']]} | {r['note']} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m scaling.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/gpu_check", help="folder for the JSON, the table and the runs")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    ap.add_argument("--part-timeout", type=int, default=300, help="seconds one part may take")
    ap.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process
    a = ap.parse_args(argv)
    out = Path(a.out)
    if a.part:
        (out / f"{a.part}.json").write_text(json.dumps(PARTS[a.part](out / a.part)))
        return
    if importlib.util.find_spec("torchdata") is None:  # GPU images often lack it; training needs it
        sys.exit("error: torchdata is not installed (scaling.loader serves batches through it): pip install "
                 "'torchdata>=0.10' (a pure-Python wheel; without a network, carry it: pip download torchdata "
                 "--no-deps, then pip install --no-deps that file)")
    out.mkdir(parents=True, exist_ok=True)
    env, rows, t0 = environment(), [], time.perf_counter()
    for name in a.parts.split(","):
        shutil.rmtree(out / name, ignore_errors=True)  # runs of an earlier check would be resumed
        (out / name).mkdir(parents=True)
        t = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, "-m", "scaling.gpu_check", "--out", str(out), "--part", name],
                               capture_output=True, text=True, cwd=ROOT, timeout=a.part_timeout)
            got = json.loads((out / f"{name}.json").read_text()) if p.returncode == 0 else [
                row(name, "error", "-", False, (p.stderr.strip().splitlines() or ["?"])[-1][:300])]
        except subprocess.TimeoutExpired:
            got = [row(name, "timed out", f"{a.part_timeout} s", False, "--part-timeout sets the limit")]
        rows += got
        for r in got:
            print(f"{r['check']}: {r['value']} ({r['note']})" if r["pass"] is not False else
                  f"FAIL {r['check']}: {r['value']} ({r['note']})", flush=True)
        print(f"  [{name}: {time.perf_counter() - t:.0f} s]", flush=True)
    env["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "gpu_check.json").write_text(json.dumps({"environment": env, "checks": rows}, indent=2))
    (out / "gpu_check.md").write_text(table(env, rows))
    print(f"\n{table(env, rows)}\nwrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {env['seconds']:.0f} s")
    sys.exit(1 if any(r["pass"] is False for r in rows) else 0)


if __name__ == "__main__":
    main()

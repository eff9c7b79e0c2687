"""Training metrics: throughput, MFU and memory, and the sinks they go to (console, JSONL, wandb)."""

import json
import math
import os
import secrets
import sys
import time
from pathlib import Path

import torch

from scaling.config import profile_range
from scaling.errors import ConfigError

# Dense bf16 peak FLOP/s (no sparsity) by the exact name torch.cuda.get_device_name() gives, from
# each vendor's datasheet: A100 312 T (SXM and PCIe, 40 and 80 GB); H100 SXM 989 T, PCIe 756 T,
# NVL 835 T; H200 SXM 989 T, NVL 835 T; GH200 989 T (its GPU is an H100's); B200 2,250 T; L40S
# 362 T; L4 121 T; A10G 125 T; RTX 4090 165 T (bf16 with fp32 accumulate); MI300X 1,307 T. Matched
# whole, never by substring (an "L40S" contains "L4", an "H100 PCIe" contains "H100"): a name not
# listed gives no MFU rather than a wrong one.
PEAK_BF16 = {
    "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA GH200 480GB": 989e12,
    "NVIDIA B200": 2250e12,
    "NVIDIA L40S": 362e12, "NVIDIA L4": 121e12, "NVIDIA A10G": 125e12, "NVIDIA GeForce RTX 4090": 165e12,
    "AMD Instinct MI300X": 1307e12,
}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None where unknown (CPUs, unlisted GPUs)."""
    return peak_for(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def peak_for(name: str) -> float | None:
    return PEAK_BF16.get(name.strip())


def memory(device: torch.device) -> dict:
    """Memory in GB since the last call (the peaks are reset after reading): on CUDA the peak
    allocated and reserved and the allocator's retries (a retry frees cached blocks and tries
    again: a run close to the limit), on CPU the current and peak resident set size."""
    if device.type == "cuda":
        out = {"mem_gb": torch.cuda.max_memory_allocated(device) / 1e9,
               "mem_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9,
               "num_alloc_retries": torch.cuda.memory_stats(device).get("num_alloc_retries", 0)}
        torch.cuda.reset_peak_memory_stats(device)
        return out
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    rss, peak = (int(status[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM"))
    _reset_peak_rss()
    return {"mem_gb": rss / 1e9, "peak_mem_gb": max(rss, peak) / 1e9}


def _reset_peak_rss():
    """Linux resets a process's peak RSS (VmHWM) when 5 is written to its clear_refs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not allowed: the peak then covers the whole run
        pass


class StepTimer:
    """Time per phase of the training step, summed until read. On CUDA the phases are bracketed
    by CUDA events, so they measure the GPU's time (the host only queues kernels and runs ahead)
    and are read when the host waits anyway (log steps); on CPU the wall clock.

    start() opens a step, mark(phase) closes the phase that ends there (marks come in order)."""

    def __init__(self, device: torch.device, phases: tuple[str, ...]):
        self.cuda, self.phases = device.type == "cuda", phases
        self.steps = []  # per step: its start mark and one mark per phase

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def start(self):
        self.steps.append([self._now()])

    def mark(self, phase: str):
        marks = self.steps[-1]
        assert self.phases[len(marks) - 1] == phase, f"phase {phase} out of order"
        marks.append(self._now())

    def read_ms(self) -> dict:
        """Milliseconds per phase summed over the steps since the last read; then starts over."""
        total = dict.fromkeys(self.phases, 0.0)
        if self.cuda and self.steps:
            self.steps[-1][-1].synchronize()
        for marks in self.steps:
            for phase, a, b in zip(self.phases, marks, marks[1:]):
                total[phase] += a.elapsed_time(b) if self.cuda else 1e3 * (b - a)
        self.steps = []
        return total


class Metrics:
    """Writes one JSON object per logged step to metrics.jsonl, a compact console line and, when
    asked, to Weights & Biases. Only the process given enabled=True writes (rank 0)."""

    def __init__(self, run_dir: Path, enabled: bool = True, wandb_cfg=None, config: dict | None = None):
        self.enabled = enabled
        self.start = time.perf_counter()
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = open_for_append(self.path) if enabled else None
        # A resumed run's clock goes on from its history: the latest time metrics.jsonl recorded
        # (work redone after a kill counts: it was spent).
        self.before = max((r.get("elapsed_s") or 0 for r in read_metrics(self.path)), default=0) if enabled else 0
        self.wandb = start_wandb(Path(run_dir), wandb_cfg, config) if enabled and wandb_cfg else None

    def elapsed(self) -> float:
        """Seconds of the whole run, over every resume."""
        return self.before + time.perf_counter() - self.start

    def session(self) -> float:
        """Seconds since this command opened the metrics."""
        return time.perf_counter() - self.start

    def log(self, record: dict):
        if not self.enabled:
            return
        record = {k: _clean(v) for k, v in record.items()}
        self.write_line((json.dumps(record) + "\n").encode())
        print(format_line(record), flush=True)
        if self.wandb:
            self.wandb.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])

    def event(self, record: dict):
        """A record that is not a step's (it has "event", and no loss): metrics.jsonl and wandb,
        not the console (the caller says it in its own words)."""
        if not self.enabled:
            return
        self.write_line((json.dumps(record) + "\n").encode())
        if self.wandb:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def write_line(self, line: bytes):
        """The whole line or nothing: a write cut short (a full disk) is undone, so that no half
        line stays for the next record, or a resumed run, to be glued onto."""
        size = os.fstat(self.file.fileno()).st_size
        try:
            rest = memoryview(line)
            while rest:  # an unbuffered write may take only part; the next one then raises
                rest = rest[self.file.write(rest):]
        except OSError as e:
            self.file.truncate(size)
            e.filename = e.filename or str(self.path)
            raise

    def close(self):
        if self.file:
            self.file.close()
        if self.wandb:
            self.wandb.finish()


def open_for_append(path: Path):
    """metrics.jsonl, unbuffered (each record is one write). A last line without its newline was
    cut short (a full disk, a killed process): it is ended first, bytes kept, so the next record
    starts a line of its own and readers skip just the damaged one."""
    f = open(path, "a+b", buffering=0)
    end = f.seek(0, os.SEEK_END)
    if end:
        f.seek(end - 1)
        if f.read(1) != b"\n":
            f.write(b"\n")
            warn(f"{path}: its last line was cut short (a full disk or a crash?); ended it, new records follow")
    return f


def read_metrics(path: str | Path, report=None) -> list[dict]:
    """The records of a metrics.jsonl. A damaged line (cut short, garbled) is skipped, and the
    file and line numbers are passed to report (default: a warning on stderr) in one line."""
    records, bad = [], []
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            try:
                r = json.loads(line)
            except ValueError:  # not JSON, or not UTF-8
                r = None
            if isinstance(r, dict) and isinstance(r.get("step"), int):
                records.append(r)
            else:
                bad.append(i)
    if bad:
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        (report or warn)(f"{path}: skipped {len(bad)} damaged line(s): {', '.join(map(str, bad[:10]))}{more}")
    return records


def warn(msg: str):
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def check_wandb(lcfg):
    """Online wandb needs credentials: missing ones are said now, in one line, before anything is
    built or written, instead of as wandb's traceback after the model is built."""
    if not lcfg.wandb or lcfg.wandb_mode != "online" or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return
    try:
        import wandb
    except ImportError:
        raise ConfigError("logging.wandb: the wandb package is not installed (pip install wandb)") from None
    try:
        found = wandb.login(prompt=False, verify=False)  # env, settings or .netrc; no network, no prompt
    except Exception as e:  # a bad WANDB_* variable or settings file
        raise ConfigError(f"logging.wandb: wandb cannot read its settings: {str(e).splitlines()[0]}") from None
    if not found:
        raise ConfigError("logging.wandb: no Weights & Biases credentials on this machine: run `wandb login`, "
                          "set WANDB_API_KEY, or add --logging.wandb_mode=offline (sync later)")


def start_wandb(run_dir: Path, lcfg, config):
    """A wandb run named after the recipe; its id is kept in the run folder, so a resumed run
    continues the same wandb run. logging.wandb_mode=offline needs no network and no account."""
    import wandb
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    id_file.write_text(run_id)
    return wandb.init(project=lcfg.wandb_project, name=(config or {}).get("name"), id=run_id, resume="allow",
                      config=config, dir=str(run_dir), mode=lcfg.wandb_mode)


def _clean(v):
    """JSON has no NaN or infinity: store them as null so every reader can parse the file."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def format_line(r: dict) -> str:
    """The console line of a record, within 100 columns even at 600,000 steps on GPUs:
        step 30/500 6.0% | loss 3.2559 | 236ms | 34.7k tok/s | 0.39GB | 246k tok | time 14s eta 1m52s
    milliseconds per step; mfu instead of tok/s where the device's peak is known; memory; tokens
    seen; the run's time over all its resumes and the time left at the steady rate. lr, grad_norm
    and the rest are in metrics.jsonl. The first interval after a start or a resume says "warm-up"
    instead of an ETA: it holds compilation and the first reads, not the steady rate."""
    step = f"step {r['step']}" + (f"/{r['max_steps']} {_percent(r['step'] / r['max_steps'])}" if "max_steps" in r else "")
    parts = [step]
    if "val_loss" in r:
        parts.append(f"val_loss {_num(r['val_loss'], '.4f')}")
    if "loss" in r:
        parts.append(f"loss {_num(r['loss'], '.4f')}")
        if "ms_per_step" in r:
            parts.append(f"{r['ms_per_step']:.0f}ms")
        parts.append(f"mfu {_percent(r['mfu'])}" if r.get("mfu") is not None else f"{_si(r['tokens_per_sec'])} tok/s")
        if "mem_gb" in r:
            parts.append(f"{r['mem_gb']:.3g}GB")
        parts.append(f"{_si(r['tokens'])} tok")
    clock = f"time {duration(r['elapsed_s'])}"
    if "loss" in r:
        clock += " warm-up" if r.get("warmup") else f" eta {duration(r['eta_s'])}" if r.get("eta_s") is not None else ""
    parts.append(clock)
    return " | ".join(parts)


def _percent(x: float) -> str:
    """0.2061 -> '21%', 0.006 -> '0.6%': two figures at most, a decimal below 10%."""
    return f"{x:.0%}" if x >= 0.1 or x == 0 else f"{x:.1%}"


def _si(n: float) -> str:
    """12345 -> '12.3k', 60.7e9 -> '60.7B': a count in three significant figures."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def duration(s: float) -> str:
    """Seconds as a clock a person reads: 14s, 1m52s, 54h05m."""
    s = round(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _num(v, fmt):
    return "nan" if v is None else format(v, fmt)


class Profiler:
    """A torch.profiler trace of the steps in logging.profile_steps ('a-b'), one file per rank."""

    def __init__(self, steps: str | None, run_dir: Path, rank: int):
        self.prof, self.first, self.last = None, None, None
        if steps:
            self.first, self.last = profile_range(steps)
        self.out = run_dir / "profile" / f"rank{rank}.json"

    def step(self, step: int):
        if self.first is None:
            return
        if step + 1 == self.first:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts, record_shapes=True, profile_memory=True)
            self.prof.__enter__()
        elif step == self.last:
            self.close()

    def close(self):
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.prof.export_chrome_trace(str(self.out))
            print(f"profile of steps {self.first}-{self.last} written to {self.out}", flush=True)
            self.prof = None

"""Check a cluster before training on it: torchrun ... -m scaling.preflight RECIPE [--section.key=value ...]

Every rank reports its host, GPUs, driver, CUDA, NCCL, torch, Python and project versions,
network interfaces and InfiniBand devices; rank 0 prints one table, one line per node, then one
line per problem, and exits 2 if there is any:
- versions that differ between ranks (a node with another driver, torch or checkout);
- fewer GPUs on a node than processes started there;
- a head address (MASTER_ADDR) that is a loopback address while the ranks are on several hosts;
- the run folder not writable on a node, or not the same folder everywhere (a file rank 0 writes
  there must be visible to every rank);
- less free space in the run folder than checkpoint.keep checkpoints of this recipe, plus the
  one being written, need (4 bytes of weights and 8 of AdamW state per parameter), less what a
  resumed run's checkpoints already occupy;
- all-reduce bus bandwidth below --min-busbw (default: 100 GB/s on one GPU node, 20 across GPU
  nodes, 1 with SCALING_FABRIC=ethernet; none on CPU): a warning, a problem with --strict.
launch/slurm_gpt2.sh runs it before training unless SCALING_PREFLIGHT=0. It takes seconds.
"""

import argparse
import ipaddress
import os
import platform
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from scaling import distributed
from scaling.config import ConfigError, die, load_config

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = ("torch", "cuda", "nccl", "driver", "python", "project")


def project_version() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def driver_version() -> str:
    if not shutil.which("nvidia-smi"):
        return "-"
    out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout.split()
    return out[0] if out else "-"


def facts() -> dict:
    """What this rank runs on."""
    cuda = torch.cuda.is_available()
    ib = Path("/sys/class/infiniband")
    return {"host": socket.gethostname(), "node": os.environ.get("SLURM_NODEID", os.environ.get("GROUP_RANK", "0")),
            "local_world": int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
            "gpus": torch.cuda.device_count() if cuda else 0,
            "gpu": torch.cuda.get_device_name() if cuda else "-",
            "torch": torch.__version__, "cuda": torch.version.cuda or "-",
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else "-",
            "driver": driver_version(), "python": platform.python_version(), "project": project_version(),
            "ifaces": sorted(n for _, n in socket.if_nameindex() if n != "lo"),
            "ib": sorted(p.name for p in ib.iterdir()) if ib.is_dir() else []}


def check_run_dir(run_dir: Path, token: str | None) -> str | None:
    """Write a file of this rank's own into the run folder; read rank 0's token back if given."""
    folder = run_dir / ".preflight"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank{dist.get_rank()}").write_text("ok")
    except OSError as e:
        return f"not writable ({e.strerror or e})"
    if token is not None and (not (folder / "token").is_file() or (folder / "token").read_text() != token):
        return "not the same folder as rank 0's (its file is not there)"
    return None


def busbw(device: torch.device, sizes=(1 << 20, 16 << 20)) -> float:
    """All-reduce bus bandwidth in GB/s, the best over a few message sizes."""
    return max(distributed.time_collective("all_reduce", size, device, iters=5, warmup=2)["busbw_gbps"]
               for size in sizes)


def default_min_busbw(device: torch.device, hosts: int) -> float:
    if device.type != "cuda" or dist.get_world_size() == 1:
        return 0.0
    if hosts == 1:
        return 100.0
    return 1.0 if os.environ.get("SCALING_FABRIC") == "ethernet" else 20.0


def checkpoint_bytes(cfg) -> float:
    from scaling.plan import shape_of
    return 12 * shape_of(cfg, cfg.model.vocab_size or 50257).P


def node_order(r: dict):
    """Nodes in their Slurm order, whichever holds rank 0 (the rendezvous decides that)."""
    return (0, int(r["node"]), "") if r["node"].isdigit() else (1, 0, r["node"])


def problems(cfg, reports: list[dict], dirs: list[str | None], on_gpus: bool, bw: float, min_bw: float,
             strict: bool) -> list[str]:
    out = []
    for key in VERSIONS:
        seen = {}
        for r in sorted(reports, key=node_order):
            seen.setdefault(r[key], []).append(f"node {r['node']}")
        if len(seen) > 1:
            out.append(f"{key} versions differ: " + "; ".join(f"{v} on {', '.join(sorted(set(n)))}" for v, n in seen.items()))
    for r in {r["node"]: r for r in reports}.values():
        if on_gpus and r["gpus"] < r["local_world"]:
            out.append(f"node {r['node']} ({r['host']}): {r['gpus']} GPUs for {r['local_world']} processes")
    hosts = {r["host"] for r in reports}
    head = os.environ.get("MASTER_ADDR", "")
    try:
        loopback = ipaddress.ip_address(socket.gethostbyname(head)).is_loopback if head else False
    except (OSError, ValueError):
        loopback = False
    if loopback and len(hosts) > 1:
        out.append(f"head address {head} is a loopback address, but the ranks run on {len(hosts)} hosts: "
                   f"set MASTER_ADDR to an address the other nodes reach")
    run_dir = Path(cfg.logging.run_dir)
    for why in sorted({(r["node"], d) for r, d in zip(reports, dirs) if d}):
        out.append(f"run folder {run_dir} on node {why[0]}: {why[1]}")
    # A resumed run's checkpoints already hold part of that space (they are among the keep + 1).
    saved = run_dir / "checkpoints"
    have = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file()) if saved.is_dir() else 0
    need = max(0.0, (cfg.checkpoint.keep + 1) * checkpoint_bytes(cfg) - have) if cfg.checkpoint.keep > 0 else 0
    # The disk the run folder is on, or would be on where it could not be made (reported above).
    disk = next(p for p in (run_dir, *run_dir.parents) if p.is_dir())
    free = shutil.disk_usage(disk).free
    if need > free:
        out.append(f"run folder {run_dir}: {free / 1e9:.1f} GB free, but checkpoint.keep={cfg.checkpoint.keep} "
                   f"checkpoints and the one being written need {need / 1e9:.1f} GB more")
    if bw < min_bw and strict:
        out.append(f"all-reduce bus bandwidth {bw:.1f} GB/s is below {min_bw:.1f} GB/s (--min-busbw)")
    return out


def table(reports: list[dict]) -> str:
    rows = [("node", "host", "procs", "gpus", "gpu", "driver", "cuda", "nccl", "torch", "python", "project", "ifaces", "ib")]
    seen = set()
    for r in sorted(reports, key=node_order):
        if r["node"] in seen:
            continue
        seen.add(r["node"])
        rows.append((r["node"], r["host"], str(r["local_world"]), str(r["gpus"]), r["gpu"], r["driver"], r["cuda"],
                     r["nccl"], r["torch"], r["python"], r["project"], ",".join(r["ifaces"]) or "-", ",".join(r["ib"]) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m scaling.preflight", description=__doc__.splitlines()[0])
    ap.add_argument("recipe", nargs="?")
    ap.add_argument("--min-busbw", type=float, help="GB/s of all-reduce bus bandwidth below which to warn")
    ap.add_argument("--strict", action="store_true", help="low bandwidth is a problem, not a warning")
    ap.error = die
    a, overrides = ap.parse_known_args(argv)
    try:
        cfg = load_config(a.recipe, overrides)
    except ConfigError as e:
        die(str(e))
    env = distributed.init("cpu" if cfg.train.device == "cpu" else "auto", cfg.parallel.timeout_s)
    run_dir = Path(cfg.logging.run_dir)
    mine = facts()
    first = check_run_dir(run_dir, None)  # makes the run folder, or says why it cannot
    # Rank 0's token, when it could write one: who cannot read it sees another folder.
    token = [uuid.uuid4().hex if env.is_main and first is None else None]
    if token[0] is not None:
        (run_dir / ".preflight" / "token").write_text(token[0])
    dist.broadcast_object_list(token, src=0)
    second = first or (check_run_dir(run_dir, token[0]) if token[0] else None)
    bw = busbw(env.device)
    reports, dirs = [None] * env.world_size, [None] * env.world_size
    dist.all_gather_object(reports, mine)
    dist.all_gather_object(dirs, second)
    dist.barrier()
    code = 0
    if env.is_main:
        shutil.rmtree(run_dir / ".preflight", ignore_errors=True)
        min_bw = a.min_busbw if a.min_busbw is not None else default_min_busbw(env.device, len({r["host"] for r in reports}))
        found = problems(cfg, reports, dirs, env.device.type == "cuda", bw, min_bw, a.strict)
        print(table(reports))
        print(f"all-reduce bus bandwidth: {bw:.2f} GB/s over {env.world_size} ranks"
              + (f" (below {min_bw:.1f} GB/s: check SCALING_FABRIC / SCALING_IFNAME)" if bw < min_bw else ""))
        for p in found:
            print(f"preflight: {p}")
        print(f"preflight: {'OK' if not found else f'{len(found)} problem(s)'}", flush=True)
        code = 2 if found else 0
    distributed.shutdown()
    sys.exit(code)


if __name__ == "__main__":
    main()

"""Shared test set-up: offline environment, vendored data from ../shared, helpers to run the CLI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SCALING_SHARED", ROOT.parent / "shared"))
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"
GPT2_BPE = SHARED / "data" / "gpt2_bpe"

# No network in tests: every library that could reach out is told not to.
os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline",
                  WANDB_SILENT="true", TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="session", autouse=True)
def tiktoken_cache(tmp_path_factory):
    """tiktoken's GPT-2 files, from ../shared, in a cache folder it reads offline."""
    from scaling.tokenizer import fill_gpt2_cache
    cache = fill_gpt2_cache(GPT2_BPE, tmp_path_factory.mktemp("tiktoken"))
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    return cache


@pytest.fixture(scope="session", autouse=True)
def hf_cache(tmp_path_factory):
    """datasets converts local files into its cache: keep that out of the user's home."""
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf_datasets"))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A data root holding 'shakes': tiny Shakespeare as byte-level token files."""
    from scaling.prepare import SplitWriter, write_meta
    from scaling.tokenizer import ByteTokenizer
    root = tmp_path_factory.mktemp("data")
    out = root / "shakes"
    out.mkdir()
    tok = ByteTokenizer()
    text = SHAKESPEARE.read_text()
    cut = int(len(text) * 0.9)
    splits = {}
    for split, part in (("train", text[:cut]), ("val", text[cut:])):
        w = SplitWriter(out, split, tok.vocab_size)
        w.write(tok.encode(part))
        splits[split] = w.close()
    write_meta(out, tok, splits, source="tiny shakespeare (test)")
    return root


TINY = ROOT / "tests" / "tiny.yaml"


def tiny_args(data_root, run_dir, *extra):
    """Arguments of scaling.train for a seconds-long run of tests/tiny.yaml."""
    return [TINY, f"--data.root={data_root}", f"--logging.run_dir={run_dir}", *extra]


def run_module(module, *args, timeout=300, env=None, check=False):
    """Run `python -m module args` in a fresh process; returns the CompletedProcess."""
    e = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), **(env or {}))
    p = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=e,
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{module} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def run_torchrun(nproc, module, *args, timeout=300, env=None, check=True):
    """`torchrun --standalone --nproc_per_node=nproc -m module args`: real processes over gloo,
    one thread each (2 cores), a short collective timeout so a hang fails fast."""
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *map(str, args)]
    p = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"torchrun {module} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def read_metrics(run_dir):
    import json
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]

"""Shared test set-up: offline environment, vendored data from ../shared, helpers to run the CLI."""

import json
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


@pytest.fixture(autouse=True)
def no_process_group_left_behind():
    """scaling.train in this process (one rank) leaves its process group of one for the next call,
    as a script would; tests start from none (the planner's --measure makes fake worlds of its own)."""
    yield
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


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


@pytest.fixture
def tmpfs(tmp_path):
    """tmpfs(options) -> a fresh tmpfs folder mounted with those options (e.g. "ro,size=1m" or
    "size=64k" for a disk that fills); needs root, as in CI, or the test skips."""
    points = []

    def make(options):
        point = tmp_path / f"tmpfs{len(points)}"
        point.mkdir()
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if p.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {p.stderr.decode().strip()}")
        points.append(point)
        return point
    yield make
    for point in points:
        subprocess.run(["umount", str(point)])


TINY = ROOT / "tests" / "tiny.yaml"
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
# A recipe shrunk in size only, for tests that run recipes as users do: 2 layers, 2 heads,
# width 32, 32 positions, micro batches of 2 (2 accumulation steps on 2 data-parallel ranks),
# 4 steps with an evaluation and a checkpoint every 2, and a short sample.
SHRUNK = ["--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32",
          "--train.seq_len=32", "--train.micro_batch_size=2", "--train.global_batch_size=8", "--train.max_steps=4",
          "--train.eval_every=2", "--train.eval_sequences=4", "--optim.warmup_steps=1", "--checkpoint.every=2",
          "--logging.every=1", "--logging.sample_tokens=8"]


def prepare_offline(name: str, out, docs_jsonl):
    """Dataset `name` prepared from local text by the same code as data/<name>/prepare.py."""
    from scaling.prepare import main, prepare_embedded
    if name == "embedded":
        prepare_embedded(out)
    elif name in ("shakespeare", "shakespeare_char"):
        main(name, ["--input", str(SHAKESPEARE), "--out", str(out), "--workers", "1"])
    else:  # the web corpora: documents in their jsonl format
        main(name, ["--input", str(docs_jsonl), "--out", str(out), "--workers", "1"])


@pytest.fixture(scope="session")
def recipe_data(tmp_path_factory):
    """A data root holding every dataset a recipe names, prepared offline: tiny Shakespeare cut
    into 4,000 documents for the web corpora (OpenWebText's 0.05% holds out 2 of them)."""
    import json

    import yaml
    root = tmp_path_factory.mktemp("recipe_data")
    docs = root / "docs.jsonl"
    text = SHAKESPEARE.read_text()
    step = len(text) // 4000
    docs.write_text("".join(json.dumps({"text": text[i:i + step]}) + "\n" for i in range(0, 4000 * step, step)))
    for name in sorted({yaml.safe_load(r.read_text())["data"]["dataset"] for r in RECIPES}):
        prepare_offline(name, root / name, docs)
    return root


def tiny_hf_gpt2(out, n_positions=64):
    """Hugging Face GPT-2 weights (config.json + model.safetensors) shaped like the shrunk
    recipes' model: 2 layers, 2 heads, width 32, GPT-2's vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=n_positions)).save_pretrained(out)
    return out


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


def run_layout_probe(script: str, data_root, layouts: dict, tmp) -> dict:
    """Run `script` under torchrun on 4 CPU processes as `probe.py DATA_ROOT LAYOUTS_JSON OUT TINY`
    (each layout's overrides in turn, in one process group); returns the JSON it writes to OUT."""
    (tmp / "probe.py").write_text(script)
    out = tmp / "result.json"
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                        str(tmp / "probe.py"), str(data_root), json.dumps(layouts), str(out), str(TINY)],
                       cwd=tmp, env=e, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text())


def read_metrics(run_dir):
    import json
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def scratch_checkout(w: Path) -> Path:
    """A folder laid out like a fresh checkout after `make install`: the code, recipes and
    launchers linked, the data/<name>/prepare.py scripts copied, and a .venv whose python and
    torchrun are this interpreter's (the launchers and the Makefile look for it)."""
    w.mkdir(parents=True, exist_ok=True)
    for name in ("recipes", "launch", "scaling", "Makefile", "pyproject.toml"):
        (w / name).symlink_to(ROOT / name)
    for script in ROOT.glob("data/*/prepare.py"):
        (w / "data" / script.parent.name).mkdir(parents=True)
        (w / "data" / script.parent.name / "prepare.py").write_bytes(script.read_bytes())
    venv = w / ".venv" / "bin"
    venv.mkdir(parents=True)
    for name, run in (("python", ""), ("python3", ""), ("torchrun", "-m torch.distributed.run")):
        (venv / name).write_text(f'#!/bin/sh\nexec {sys.executable} {run} "$@"\n')
        (venv / name).chmod(0o755)
    (w / ".venv" / ".installed").touch()  # its timestamp tells make that it is installed
    return w


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A two-node Slurm cluster on loopback (tests/slurm_cluster.py), one per test module."""
    from slurm_cluster import Cluster, install
    reason = install()
    if reason:
        pytest.skip(reason)
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()


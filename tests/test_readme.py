"""The README's commands, run as a user types them, offline and shrunk.

Every line of every ```bash block is a command (those of "Reproduce GPT-2 124M" run in
tests/test_reproduce.py, on a Slurm cluster). A line marked [GPU] (needs GPUs or a GPU
cluster) or [network] (downloads something) is listed, not run; `make test` is this suite.
Every other line runs, in README order, from a scratch folder laid out like the checkout
(recipes/, launch/, data/<name>/prepare.py, a .venv whose python and torchrun are this
interpreter's), with the datasets prepared offline and scaling.train shrunk by SHRUNK (inserted
after the recipe, so the README's own overrides still win). Console blocks that start with
`$ ` run too, and their output must be what the README shows. A new command that can run
neither offline nor on CPU fails here until it is marked.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT, SHRUNK, scratch_checkout, tiny_hf_gpt2

README = (ROOT / "README.md").read_text()
REPRODUCE = "Reproduce GPT-2 124M"  # a walk of its own on a Slurm cluster: tests/test_reproduce.py


def section(title: str, text: str = README) -> str:
    """The text of the `## title` section, up to the next `## `."""
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


OUTSIDE_REPRODUCE = README.replace(section(REPRODUCE), "\n")
MARKS = ("[GPU]", "[network]")
SELF = {"make test"}  # the suite this test is part of


def blocks(lang: str, text: str = OUTSIDE_REPRODUCE) -> list[list[str]]:
    """The lines of each fenced block opened by ```lang."""
    found, block = [], None  # block: the open block's lines, or None outside, or False in another language
    for line in text.splitlines():
        if not line.startswith("```"):
            if isinstance(block, list):
                block.append(line)
        elif block is None:
            block = [] if line[3:].strip() == lang else False
        else:
            if block is not False:
                found.append(block)
            block = None
    return found


def commands(text: str = OUTSIDE_REPRODUCE) -> list[str]:
    lines = [line.strip() for b in blocks("bash", text) for line in b]
    return [line for line in lines if line and not line.startswith("#")]


def marked(cmd: str) -> bool:
    return any(m in cmd for m in MARKS)


def console_examples() -> list[tuple[str, list[str]]]:
    """(command, the output lines the README shows) for each ``` block opening with `$ `."""
    return [(b[0][2:], b[1:]) for b in blocks("") if b and b[0].startswith("$ ")]


def strip(cmd: str) -> str:
    return cmd.split("  #")[0].split(" # ")[0].strip()


def shrink(cmd: str) -> str:
    """The command as the test runs it: comments dropped, scaling.train shrunk right after its
    recipe, more than 4 processes cut to 2, sizes fitted to the shrunk model."""
    cmd = strip(cmd)
    if cmd.startswith("make demo"):
        return f"{cmd} DEMO_RUN=runs/cpu_demo ARGS='{' '.join(SHRUNK)}'"
    words = shlex.split(cmd)
    for i, w in enumerate(words):
        if w.endswith(".yaml") and ("scaling.train" in words or "launch/torchrun.sh" in words):
            words[i + 1:i + 1] = SHRUNK
            break
    cmd = shlex.join(words)
    cmd = re.sub(r"--nproc_per_node=([5-9]|\d\d+)", "--nproc_per_node=2", cmd)
    cmd = cmd.replace("--seq-len 256", "--seq-len 32").replace("--max-new-tokens 200", "--max-new-tokens 20")
    cmd = cmd.replace("--train.max_steps=100", "--train.max_steps=8")
    if "scaling.bench comm" in cmd:
        cmd += " --max-mb 4"
    return cmd


@pytest.fixture(scope="module")
def workdir(recipe_data, tmp_path_factory):
    """A scratch folder laid out like the checkout, with what the README's commands expect to
    find already there (a downloaded model, a nanoGPT checkpoint, a local corpus)."""
    w = scratch_checkout(tmp_path_factory.mktemp("readme"))
    for prepared in recipe_data.iterdir():
        if prepared.is_dir():
            for f in prepared.iterdir():
                (w / "data" / prepared.name / f.name).symlink_to(f)
    tiny_hf_gpt2(w / "weights" / "gpt2")
    shutil.copy(recipe_data / "docs.jsonl", w / "my.jsonl")
    return w


def run(cmd: str, cwd):
    env = dict(os.environ, PATH=f"{cwd}/.venv/bin:{os.environ['PATH']}", OMP_NUM_THREADS="1")
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


NOT_RUN = [  # each with the reason the README gives
    "make test",
    "python data/shakespeare_char/prepare.py", "python data/shakespeare/prepare.py",
    "python data/openwebtext/prepare.py", "python data/openwebtext/prepare.py --streaming",
    "python data/fineweb_edu/prepare.py",
    "sbatch launch/slurm_gpt2.sh recipes/gpt2_124m_fsdp.yaml",
    "sbatch --nodes=4 --time=2-00:00:00 launch/slurm_gpt2.sh recipes/gpt2_xl_fsdp.yaml",
    "NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/torchrun.sh recipes/gpt2_124m_fsdp.yaml",
    "NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/torchrun.sh recipes/gpt2_124m_fsdp.yaml",
    "NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 SCALING_MODULE=scaling.bench launch/torchrun.sh comm",
    "SCALING_MIN_NODES=3 sbatch --nodes=4 launch/slurm_gpt2.sh recipes/gpt2_xl_fsdp.yaml",  # tests/test_elastic.py
    "NNODES=4 SCALING_MIN_NODES=3 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/torchrun.sh RECIPE",
    "python -m scaling.eval weights/gpt2 hellaswag",
]


def test_the_commands_not_run_here_are_exactly_the_marked_ones():
    """So that the list cannot grow unnoticed: a new command either runs below or is marked
    and added here."""
    assert sorted(strip(c) for c in commands() if marked(c) or strip(c) in SELF) == sorted(NOT_RUN)
    assert len(commands()) - len(NOT_RUN) >= 17


def test_the_readme_commands_run_in_order(workdir):
    ran = []
    for cmd in commands():
        if marked(cmd) or strip(cmd) in SELF:
            continue
        if cmd.startswith("python -m scaling.convert nanogpt/"):  # the file nanoGPT would have written
            (workdir / "nanogpt" / "out").mkdir(parents=True, exist_ok=True)
            shutil.copy(workdir / "out" / "ckpt.pt", workdir / "nanogpt" / "out" / "ckpt.pt")
        t0 = time.perf_counter()
        p = run(shrink(cmd), workdir)
        print(f"{time.perf_counter() - t0:5.1f}s  {strip(cmd)}")  # pytest -s: where the time goes
        assert p.returncode == 0, f"{cmd}\n-> {shrink(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        ran.append((cmd, p))
    outputs = {strip(cmd): p.stdout + p.stderr for cmd, p in ran}
    assert "sample:\n" in outputs["make demo"] and "cpu_demo: validation loss" in outputs["make demo"]
    assert (workdir / "runs" / "cpu_demo" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    tp = "NPROC=4 launch/torchrun.sh recipes/cpu_demo.yaml --parallel.dp_shard=2 --parallel.tp=2 --logging.run_dir=runs/cpu_demo_tp"
    assert "FSDP+TP" in outputs[tp] and "sample:\n" in outputs[tp]
    assert "may give inconsistent results" not in outputs[tp]  # DTensor's warning on a 2-D gradient norm
    assert (workdir / "out" / "hf" / "config.json").is_file() and (workdir / "gpt2.pt").is_file()
    assert (workdir / "curves.png").is_file() and (workdir / "data" / "mine" / "meta.json").is_file()
    rows = json.loads((workdir / "runs" / "bench_comm.json").read_text())["comm"]  # the interconnect benchmark
    assert {r["op"] for r in rows} == {"all_reduce", "all_gather", "reduce_scatter"}
    assert all(r["busbw_gbps"] > 0 and r["time_us"] > 0 for r in rows)


def loose(line: str) -> str:
    """A line of a training run with its measurements masked: numbers become N, durations T
    (losses, speeds and times differ between machines; the words and the shape must not)."""
    line = re.sub(r"N[kMB]\b", "N", re.sub(r"\d+(?:[.,]\d+)*", "N", line))
    return re.sub(r"\bN(?:hNm|mNs|s)\b", "T", line)


def matches(got: list[str], shown: list[str]) -> bool:
    """got is what shown shows; a line `...` in shown stands for any lines (none included)."""
    if not shown:
        return not got
    if shown[0] == "...":
        return any(matches(got[i:], shown[1:]) for i in range(len(got) + 1))
    return bool(got) and got[0] == shown[0] and matches(got[1:], shown[1:])


# Training runs' examples (16 s each) in the slow tier, to keep `make test` within its budget.
@pytest.mark.parametrize("cmd, shown", [pytest.param(c, s, marks=[pytest.mark.slow] if "scaling.train" in c else [])
                                        for c, s in console_examples()],
                         ids=lambda x: x.split()[2] if isinstance(x, str) else "")
def test_console_example_prints_what_the_readme_shows(cmd, shown, workdir):
    p = run(cmd, workdir)
    got = (p.stdout + p.stderr).strip("\n").splitlines()
    if "scaling.train" in cmd:  # a run's measurements vary: its lines are compared masked
        got, shown = [loose(line) for line in got], [loose(line) for line in shown]
    assert matches(got, shown), "\n".join(got)

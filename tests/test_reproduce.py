"""The README's "Reproduce GPT-2 124M", walked as a user walks it: its commands, read from the
README in order, run on CPU in a scratch checkout.

What a laptop lacks is stood in for, and nothing else changes: the Hugging Face hub is a loopback
hub serving a small OpenWebText (tests/loopback_hub.py), the cluster is two Slurm nodes on
loopback (tests/slurm_cluster.py) with a CPU process standing in for each node's GPUs, and the
run is the recipe shrunk to a tiny model (the README's command, with overrides appended). The
preemption is Slurm's own signal, sent by the README's `scancel` line in the middle of training;
the job must save, requeue itself and finish. Then the evaluation, the sample, the Hugging Face
export and `transformers.pipeline` on it, whose greedy text must be what `scaling.sample` gives.

Every command of the section must be known here (HOW); a command added to the README without a
way to run it here, or a step removed from it, fails the first test.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from conftest import GPT2_BPE, read_metrics, scratch_checkout
from test_readme import REPRODUCE, blocks, commands, section, strip

SECTION = section(REPRODUCE)
RUN = "runs/gpt2_124m_fsdp"

# How each command of the section runs here: "run" as written (in order, in one environment:
# an `export` line sets a variable for the lines after it), or the reason it cannot.
HOW = {
    "python3 -m venv .venv": "not run: installs torch from the network; the scratch checkout's .venv is this interpreter",
    ".venv/bin/pip install -e .": "not run: the network; the package is this checkout",
    "export TIKTOKEN_CACHE_DIR=": "run",
    "python -c \"import tiktoken": "not run: downloads the BPE files; the next line fills the cache offline",
    "python -m scaling.tokenizer --cache": "run",
    "python data/openwebtext/prepare.py": "run against the loopback hub",
    "python -m scaling.plan": "run",
    "srun --nodes=1 --gpus=1 --time=20 make gpu-check": "not run: needs a GPU (its CPU parts: tests/test_gpu_check.py)",
    "sbatch launch/slurm_gpt2.sh": "run on the loopback cluster, CPU nodes, the recipe shrunk",
    "tail -f": "run as tail -n, while the job trains",
    "scancel --signal=USR1 --batch JOB": "run once training has logged steps",
    "python -m scaling.eval": "run (HellaSwag from a local file)",
    "python -m scaling.sample": "run",
    "python -m scaling.convert": "run",
}

# The recipe shrunk to a tiny model on 2 CPU processes (one per node), in fp32 so that the Hugging
# Face pipeline (fp32) computes what scaling.sample does; long enough to be stopped in the middle;
# 64 positions, for HellaSwag's longest example (a context and an ending).
TRAIN = ["--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=64",
         "--train.seq_len=64", "--train.micro_batch_size=2", "--train.global_batch_size=8",
         "--train.max_steps=300", "--train.eval_every=100", "--train.eval_sequences=4", "--train.dtype=fp32",
         "--optim.warmup_steps=10", "--optim.decay_steps=300", "--checkpoint.every=100", "--logging.every=1",
         "--logging.sample_tokens=8", "--parallel.timeout_s=60"]
SBATCH_CPU = ["--cpus-per-task=1", "--gpus-per-node=0", "--time=30", "--parsable"]


def ran(out: dict, *parts: str) -> str:
    """The output of the one command run that holds each of parts."""
    [p] = [p for c, p in out.items() if all(x in c for x in parts)]
    return p.stdout


def how(cmd: str) -> str | None:
    return next((v for k, v in HOW.items() if strip(cmd).startswith(k)), None)


def test_every_step_of_the_reproduction_is_known_here():
    cmds = commands(SECTION)
    assert [c for c in cmds if how(c) is None] == [], "a new command in the README: say in HOW how it runs here"
    assert {k for k in HOW if not any(strip(c).startswith(k) for c in cmds)} == set(), "a step left the README"
    assert len(blocks("python", SECTION)) == 1
    assert blocks("", SECTION)[0][0].startswith("gpt2_124m_fsdp: "), "the planner's output follows its command"


def shrink(cmd: str, job: int | None) -> str:
    """The README's command as it runs here (see HOW)."""
    cmd = strip(cmd).replace("JOB", str(job))
    if cmd.startswith("sbatch "):
        words = shlex.split(cmd)
        script = words.index("launch/slurm_gpt2.sh")
        return shlex.join([*words[:script], *SBATCH_CPU, *words[script:], *TRAIN])
    if cmd.startswith("python data/openwebtext/prepare.py"):
        return cmd + " --workers 1"
    if cmd.startswith("tail -f"):
        return cmd.replace("tail -f", "tail -n 40")
    if "hellaswag" in cmd:
        return cmd + " --file hellaswag_val.jsonl"
    cmd = cmd.replace("--sequences 2000", "--sequences 4")
    return cmd.replace("--max-new-tokens 40", "--max-new-tokens 12")


@pytest.mark.slow
def test_the_reproduction_runs_from_a_fresh_checkout_to_a_hugging_face_pipeline(slurm, tmp_path):
    from loopback_hub import LoopbackHub
    from test_eval import hellaswag_file
    from test_prepare import hub_env, owt_repo
    w = scratch_checkout(tmp_path / "checkout")
    shutil.copytree(GPT2_BPE, w / "gpt2_bpe")  # OpenAI's two BPE files, as a user without internet copies them
    hellaswag_file(w / "hellaswag_val.jsonl")
    owt_repo(tmp_path / "hub", "train")
    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_CACHE_DIR"}  # the README's export sets it
    env.update(PATH=f"{w}/.venv/bin:{env['PATH']}", OMP_NUM_THREADS="1", SCALING_DEVICE="cpu",
               SLURM_CONF=slurm.env["SLURM_CONF"])  # the loopback cluster, where a real one has /etc/slurm
    out, job = {}, None
    with LoopbackHub(tmp_path / "hub") as hub:
        env.update({k: v for k, v in hub_env(hub, tmp_path).items() if k.startswith("HF_")})
        for cmd in commands(SECTION):
            if not how(cmd).startswith("run"):
                continue
            if strip(cmd).startswith("export "):
                name, value = strip(cmd)[len("export "):].split("=", 1)
                env[name] = value.replace("$PWD", str(w))
                continue
            p = subprocess.run(["bash", "-c", shrink(cmd, job)], cwd=w, env=env, capture_output=True, text=True,
                               timeout=600)
            assert p.returncode == 0, f"{cmd}\n-> {shrink(cmd, job)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
            out[strip(cmd)] = p
            if strip(cmd).startswith("sbatch"):
                job = int(p.stdout.strip().split(";")[0])
                # the README's `tail -f` and `scancel` lines come next: preempt mid-run, then follow it to its end
                deadline = time.time() + 300
                while len(read_metrics(w / RUN) if (w / RUN / "metrics.jsonl").is_file() else []) < 20:
                    assert time.time() < deadline, slurm.logs()
                    time.sleep(0.5)
            if strip(cmd).startswith("scancel"):
                j = slurm.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=600)
                assert j["JobState"] == "COMPLETED" and int(j["Restarts"]) == 1, j

    job_out = (w / f"gpt2-{job}.out").read_text()
    assert "USR1: asking the training processes to save and stop" in job_out and "requeueing job" in job_out, job_out
    logs = "".join(f.read_text() for f in sorted((w / "logs").iterdir()))
    saved = re.search(r"saved step (\d+)", logs)
    assert saved and f"at step {saved.group(1)}" in logs, logs  # the requeued job resumed from the stop's save
    assert [r["step"] for r in read_metrics(w / RUN) if "loss" in r] == list(range(1, 301))  # each step once
    assert (w / "data" / "openwebtext" / "meta.json").is_file()
    assert ran(out, "python -m scaling.plan").splitlines() == blocks("", SECTION)[0]  # the plan the README shows
    follow = ran(out, "tail -f")  # the job's output, named as the README names it, while it trained
    assert f"job {job}" in follow and "preflight: OK" in follow, follow
    progress = re.search(r"progress: tail -f (\S+)", job_out)
    assert progress and "| loss " in (w / progress.group(1)).read_text(), job_out  # the file it names
    assert '"loss"' in ran(out, "python -m scaling.eval", " loss ") and '"acc' in ran(out, "python -m scaling.eval", "hellaswag")

    # The pipeline's greedy continuation is scaling.sample's, word for word.
    sample = ran(out, "python -m scaling.sample")
    code = "\n".join(blocks("python", SECTION)[0]).replace("max_new_tokens=40", "max_new_tokens=12")
    p = subprocess.run([sys.executable, "-c", code], cwd=w, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout == sample and len(sample) > len("The meaning of life is\n"), (p.stdout, sample)  # whitespace too

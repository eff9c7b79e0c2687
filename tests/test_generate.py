"""Generation under every parallel layout: the same weights, prompt, seed and temperature give
the same text as one process, for any prompt length (1 token, lengths the TP degree does not
divide, up to and past block_size), greedy and sampled.

One torchrun of 4 processes builds the model under each layout the way scaling.train does
(per-name init: the same weights everywhere), generates, and writes what every rank produced.
block_size is 65 so that padding for sequence parallelism (TP 2) can run past it.
"""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_layout_probe, run_module, run_torchrun, tiny_args

PROBE = r'''
import json, sys
import torch, torch.distributed as dist
from scaling.config import load_config
from scaling.parallel import ParallelDims, build_mesh
from scaling.model import GPT
from scaling.config import model_config
from scaling.train import build_model

dist.init_process_group("gloo")
rank = dist.get_rank()
data_root, layouts, out, recipe = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
PROMPT_LENGTHS = [1, 5, 64, 65, 70]  # odd ones pad; block_size 65: 64 and 65 reach it, 70 is cropped
NEW = 4


def texts(model):
    """Token ids generated for each prompt length, greedy and sampled (temperature 0.8, top-k 20)."""
    model.eval()
    with torch.no_grad():
        for prm in model.parameters():
            prm.mul_(5)  # std 0.1: decisive logits, far from ties
    got = {}
    for n in PROMPT_LENGTHS:
        idx = torch.randint(0, 257, (1, n), generator=torch.Generator().manual_seed(n))
        for temperature in (0.0, 0.8):
            g = torch.Generator().manual_seed(1234)
            ids = model.generate(idx, NEW, temperature=temperature, top_k=20, generator=g)
            got[f"{n}@{temperature}"] = ids[0, n:].tolist()
    return got


def config(overrides):
    return load_config(recipe, [f"--data.root={data_root}", "--model.block_size=65", *overrides])


def build(overrides):
    cfg = config(overrides)
    p = cfg.parallel
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp)
    return build_model(cfg, 257, dims, build_mesh(dims, "cpu")[0], torch.device("cpu"))


result = {}
if rank == 0:  # the reference: one process, the bare model (in fp32 FSDP's wrapper changes no number)
    ref = GPT(model_config(config([]), 257))
    ref.init_weights(config([]).train.seed)
    result["single"] = texts(ref)
for name, overrides in layouts.items():
    got = texts(build(overrides))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, got)
    result[name] = every
if rank == 0:
    with open(out, "w") as f:
        json.dump(result, f)
dist.barrier()  # every rank done before any tears its group down (gloo aborted a rank there)
dist.destroy_process_group()
'''

LAYOUTS = {  # 4 processes each
    "ddp4": ["--parallel.dp_replicate=4", "--parallel.dp_shard=1"],
    "fsdp4": ["--parallel.dp_shard=4"],
    "hsdp2x2": ["--parallel.dp_replicate=2", "--parallel.dp_shard=2"],
    "tp2_x_dp2": ["--parallel.tp=2", "--parallel.dp_replicate=2", "--parallel.dp_shard=1",
                  "--parallel.sequence_parallel=false"],
    "tp2_sp_x_dp2": ["--parallel.tp=2", "--parallel.dp_replicate=2", "--parallel.dp_shard=1"],
    "fsdp2_x_tp2": ["--parallel.dp_shard=2", "--parallel.tp=2", "--parallel.sequence_parallel=false"],
    "fsdp2_x_tp2_sp": ["--parallel.dp_shard=2", "--parallel.tp=2"],
    "tp2_sp_no_loss_parallel": ["--parallel.tp=2", "--parallel.dp_replicate=2", "--parallel.dp_shard=1",
                                "--parallel.loss_parallel=false"],
}


@pytest.fixture(scope="module")
def probe(data_root, tmp_path_factory):
    return run_layout_probe(PROBE, data_root, LAYOUTS, tmp_path_factory.mktemp("generate"))


@pytest.mark.slow  # one 4-process probe of every layout: the default tier has no room for it
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_rank_generates_what_one_process_generates(layout, probe):
    want = probe["single"]
    assert len({len(v) for v in want.values()}) == 1 and len(want) == 10  # 5 prompt lengths x 2 temperatures
    for rank, got in enumerate(probe[layout]):
        assert got == want, f"rank {rank}"


@pytest.mark.slow  # it reads the same probe
def test_the_reference_depends_on_the_prompt(probe):
    """The comparison above is not between constant outputs."""
    greedy = [tuple(v) for k, v in probe["single"].items() if k.endswith("@0.0")]
    assert len(set(greedy)) > 1


END_TO_END = [  # (name, processes, overrides); every layout's generate() is covered by the probe above
    pytest.param("tp2_sp", 2, ["--parallel.tp=2", "--parallel.dp_shard=1"], id="tp2_sp", marks=pytest.mark.slow),
    pytest.param("tp2", 2, ["--parallel.tp=2", "--parallel.dp_shard=1", "--parallel.sequence_parallel=false"],
                 id="tp2", marks=pytest.mark.slow),
    pytest.param("hsdp2x2", 4, ["--parallel.dp_replicate=2", "--parallel.dp_shard=2"], id="hsdp2x2",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name, nproc, layout", END_TO_END)
def test_end_of_training_sample_with_an_odd_prompt_is_what_scaling_sample_gives(name, nproc, layout, data_root,
                                                                               tmp_path):
    """The README's TP example used to crash in its end-of-training sample (a prompt length the
    TP degree does not divide). The run's greedy sample must also be what scaling.sample prints
    from the checkpoint in one process."""
    run = tmp_path / name
    p = run_torchrun(nproc, "scaling.train", *tiny_args(data_root, run, *layout, "--train.max_steps=4",
                                                       "--logging.sample_tokens=40", "--logging.sample_prompt=ROMEO",
                                                       "--logging.sample_temperature=0"))
    sample = p.stdout.split("sample:\n", 1)[1].split("\ndone: ", 1)[0].rstrip("\n")  # the run's summary follows it
    assert sample.startswith("ROMEO")
    s = run_module("scaling.sample", run, "--prompt", "ROMEO", "--max-new-tokens", "40", "--temperature", "0",
                   check=True)
    assert s.stdout.rstrip("\n") == sample


# The real command, with generate() rigged: the logits of ids past the byte tokenizer's 257 (the
# rows a padded vocabulary adds) raised far above the real ones, so they win every draw unless
# generation is limited to the tokenizer's ids. The ids drawn are written to $DRAWN_IDS: the byte
# tokenizer decodes by dropping ids it does not know, so the text alone would not show them.
RIGGED = r'''
import os, runpy, sys
import torch
from scaling.model import GPT

real_generate = GPT.generate


def generate(self, idx, *args, **kwargs):
    def boost(module, inputs, logits):
        return logits + (torch.arange(logits.shape[-1], device=logits.device) >= 257) * 1e4
    hook = self.lm_head.register_forward_hook(boost)
    try:
        out = real_generate(self, idx, *args, **kwargs)
    finally:
        hook.remove()
    with open(os.environ["DRAWN_IDS"], "a") as f:
        f.write(" ".join(map(str, out[0, idx.shape[1]:].tolist())) + "\n")
    return out


GPT.generate = generate
runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)
'''


def run_rigged(module, *args, ids_file):
    """`python -m module args` with generate() rigged; (the process, the ids it drew)."""
    env = dict(os.environ, OMP_NUM_THREADS="2", DRAWN_IDS=str(ids_file))
    p = subprocess.run([sys.executable, "-c", RIGGED, module, *map(str, args)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    drawn = [int(i) for i in ids_file.read_text().split()] if ids_file.exists() else []
    return p, drawn


@pytest.fixture(scope="module")
def padded_run(data_root, tmp_path_factory):
    """A run with the byte vocabulary (257 ids) padded to 320 rows, its end-of-training sample
    drawn rigged: (run folder, the ids that sample drew)."""
    tmp = tmp_path_factory.mktemp("padded")
    p, drawn = run_rigged("scaling.train", *tiny_args(data_root, tmp / "run", "--model.vocab_size=320",
                                                      "--train.max_steps=2", "--train.eval_every=2",
                                                      "--logging.sample_tokens=24"), ids_file=tmp / "ids")
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp / "run", drawn


def test_end_of_training_sample_never_draws_a_padded_id(padded_run):
    _, drawn = padded_run
    assert len(drawn) == 24
    assert max(drawn) < 257, f"padded ids drawn: {sorted(set(i for i in drawn if i >= 257))}"


def test_sample_command_never_draws_a_padded_id(padded_run, tmp_path):
    run, _ = padded_run
    p, drawn = run_rigged("scaling.sample", run, "--max-new-tokens", "24", ids_file=tmp_path / "ids")
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(drawn) == 24
    assert max(drawn) < 257, f"padded ids drawn: {sorted(set(i for i in drawn if i >= 257))}"


def test_sample_names_the_checkpoint_step_it_loaded(padded_run):
    run, _ = padded_run
    p = run_module("scaling.sample", run, "--max-new-tokens", 4, "--device", "cpu", check=True)
    assert p.stderr == f"loaded {run / 'checkpoints' / 'step_2'} (step 2)\n", p.stderr  # stdout: the samples alone

"""Generation under every parallel layout: the same weights, prompt, seed and temperature give
the same text as one process, for any prompt length (1 token, lengths the TP degree does not
divide, up to and past block_size), greedy and sampled.

One torchrun of 4 processes builds the model under each layout the way scaling.train does
(per-name init: the same weights everywhere), generates, and writes what every rank produced.
block_size is 65 so that padding for sequence parallelism (TP 2) can run past it.
"""

import pytest

from conftest import run_layout_probe, run_module, run_torchrun, tiny_args

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


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_rank_generates_what_one_process_generates(layout, probe):
    want = probe["single"]
    assert len({len(v) for v in want.values()}) == 1 and len(want) == 10  # 5 prompt lengths x 2 temperatures
    for rank, got in enumerate(probe[layout]):
        assert got == want, f"rank {rank}"


def test_the_reference_depends_on_the_prompt(probe):
    """The comparison above is not between constant outputs."""
    greedy = [tuple(v) for k, v in probe["single"].items() if k.endswith("@0.0")]
    assert len(set(greedy)) > 1


END_TO_END = [  # (name, processes, overrides); every layout's generate() is covered by the probe above
    pytest.param("tp2_sp", 2, ["--parallel.tp=2", "--parallel.dp_shard=1"], id="tp2_sp"),
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
    sample = p.stdout.split("sample:\n", 1)[1].rstrip("\n")
    assert sample.startswith("ROMEO")
    s = run_module("scaling.sample", run, "--prompt", "ROMEO", "--max-new-tokens", "40", "--temperature", "0",
                   check=True)
    assert s.stdout.rstrip("\n") == sample

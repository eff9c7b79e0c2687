"""Every file in recipes/ runs as its users run it, shrunk only in size.

Each recipe keeps its dataset and tokenizer (prepared here from local text by the real
preparation code), dtype, activation checkpointing, dropout, gradient accumulation, evaluation,
checkpointing, fine-tuning start and parallel layout shape; only the model (2 layers, 2 heads,
width 32, 32 positions), the batch and the number of steps shrink. Its layout keeps each degree
it names (-1 or more than 1 become 2; a degree it leaves out stays 1), so an FSDP x TP(5) recipe
runs FSDP(2) x TP(2) in 4 processes. It trains 4 steps, evaluates, checkpoints, samples, then
the same command with 2 more steps resumes. A recipe added later is picked up by the glob.

Before that, every recipe resolves at the full-size layout its header states, and the Slurm
launcher's default recipe at the launcher's default layout: a batch that does not divide over
the ranks fails here, not on a rented cluster.
"""

import math
import re

import pytest
import yaml

from conftest import RECIPES, ROOT, SHRUNK, read_metrics, run_module, run_torchrun, tiny_hf_gpt2
from scaling.config import load_config

DEGREES = ("dp_replicate", "dp_shard", "tp")


def shrunk_layout(raw: dict) -> dict:
    """The recipe's own parallel degrees, at most 2 each and 4 processes in all."""
    named = raw.get("parallel") or {}
    layout = {k: 1 if named.get(k, 1) in (0, 1) else 2 for k in DEGREES}
    if math.prod(layout.values()) > 4:
        layout["dp_replicate"] = 1  # HSDP x TP: keep the sharding and the tensor parallelism
    return layout


def shrunk_args(raw: dict, layout: dict, data_root, run_dir, hf_dir) -> list[str]:
    named = raw.get("parallel") or {}
    # A degree of -1 stays -1: the launcher's world size resolves it, as on the real cluster.
    args = [f"--data.root={data_root}", f"--logging.run_dir={run_dir}", *SHRUNK,
            *(f"--parallel.{k}={v}" for k, v in layout.items() if named.get(k) != -1)]
    if (raw.get("model") or {}).get("init_from"):
        args.append(f"--model.init_from={hf_dir}")
    return args


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return tiny_hf_gpt2(tmp_path_factory.mktemp("hf_gpt2"))


# In the slow tier: the HSDP recipes shrink to the HSDP(2x2) the layout matrix already runs, and
# the 350M and 774M FSDP recipes to the FSDP(2) of gpt2_124m_fsdp, from which they differ only in
# model size (shrunk away), learning rate and batch. gpt2_124m_ddp and gpt2_xl_fsdp_tp shrink to
# DDP(2) and FSDP(2) x TP(2), which the layout matrix in tests/test_parallel.py runs in the default
# tier against one process (ddp2, fsdp2_tp2); gpt2_124m_ddp differs from gpt2_124m_fsdp only there.
# gpt2_xl_fsdp and cpu_demo shrink to gpt2_124m_fsdp's FSDP(2) too (cpu_demo also runs as `make
# demo` in tests/test_readme.py), which keeps `make test` within its 15 minutes.
SLOW_TIER = ("gpt2_774m_hsdp", "gpt2_xl_hsdp", "gpt2_350m_fsdp", "gpt2_774m_fsdp", "gpt2_124m_ddp", "gpt2_xl_fsdp_tp",
             "gpt2_xl_fsdp", "cpu_demo", "gpt2_124m_finetune_owt")


def first_recipe_per_layout() -> set:
    """One recipe of each shrunk layout: the one whose samples are checked against one process,
    from the default tier where the layout has one there (DDP(2), HSDP(2x2) and FSDP(2) x TP(2)
    have only slow-tier recipes)."""
    seen = {}
    for r in sorted(RECIPES, key=lambda r: r.stem in SLOW_TIER):  # stable: default tier first
        seen.setdefault(tuple(shrunk_layout(yaml.safe_load(r.read_text())).values()), r)
    return set(seen.values())


CROSS_CHECKED = first_recipe_per_layout()


def launch(nproc: int, recipe, args):
    if nproc == 1:
        return run_module("scaling.train", recipe, *args, check=True)
    return run_torchrun(nproc, "scaling.train", recipe, *args)


def test_every_recipe_is_found():
    assert len(RECIPES) >= 9 and all(r.suffix == ".yaml" for r in RECIPES)


# "# Layout: 2 nodes x 8 GPUs", "# Layout: 1 GPU", "# Layout: 1 CPU machine, 2 processes"
LAYOUT = re.compile(r"# Layout: (?:(\d+) (?:nodes? x|CPU machines?,) )?(\d+) (?:GPUs?|process(?:es)?)")


def layout_lines(recipe) -> list[str]:
    header = []
    for line in recipe.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    return [line for line in header if line.startswith("# Layout:")]


def documented_layout(recipe) -> tuple[int, int]:
    """(nodes, processes per node) from the recipe's header."""
    nodes, per_node = LAYOUT.fullmatch(layout_lines(recipe)[0]).groups()
    return int(nodes or 1), int(per_node)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_header_states_its_layout_in_one_line(recipe):
    lines = layout_lines(recipe)
    assert len(lines) == 1 and LAYOUT.fullmatch(lines[0]), lines


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_resolves_at_the_layout_it_documents(recipe):
    # The training run's own resolution and checks (degrees, TP inside a node, batch divisibility),
    # at the full-size world: no process group, no processes.
    nodes, per_node = documented_layout(recipe)
    cfg = load_config(str(recipe), world=nodes * per_node, per_node=per_node)
    p = cfg.parallel
    assert p.dp_replicate * p.dp_shard * p.tp == nodes * per_node
    # At its own layout a recipe's micro batch divides each rank's share: it gives way (with a
    # warning) only on another world size, as after a node is lost.
    assert cfg.train.micro_batch_size == yaml.safe_load(recipe.read_text())["train"]["micro_batch_size"]


def launcher_defaults() -> tuple[str, int, int]:
    """The default recipe, nodes and GPUs per node of `sbatch launch/slurm_gpt2.sh`."""
    text = (ROOT / "launch" / "slurm_gpt2.sh").read_text()
    found = [re.search(pattern, text, re.M) for pattern in
             (r"^RECIPE=\$\{1:-(\S+)\}$", r"^#SBATCH --nodes=(\d+)$", r"^#SBATCH --gpus-per-node=(\d+)$")]
    assert all(found), "launch/slurm_gpt2.sh: default RECIPE, #SBATCH --nodes or --gpus-per-node not found"
    recipe, nodes, per_node = (m.group(1) for m in found)
    return recipe, int(nodes), int(per_node)


def test_launchers_default_recipe_resolves_at_the_launchers_default_layout():
    recipe, nodes, per_node = launcher_defaults()
    cfg = load_config(str(ROOT / recipe), world=nodes * per_node, per_node=per_node)
    p = cfg.parallel
    assert p.dp_replicate * p.dp_shard * p.tp == nodes * per_node
    assert cfg.train.micro_batch_size == yaml.safe_load((ROOT / recipe).read_text())["train"]["micro_batch_size"]


@pytest.mark.parametrize("recipe", [pytest.param(r, marks=pytest.mark.slow) if r.stem in SLOW_TIER else r for r in RECIPES],
                         ids=lambda p: p.stem)
def test_recipe_trains_evaluates_checkpoints_samples_and_resumes(recipe, recipe_data, hf_dir, tmp_path):
    raw = yaml.safe_load(recipe.read_text())
    layout = shrunk_layout(raw)
    nproc = math.prod(layout.values())
    run = tmp_path / "run"
    args = shrunk_args(raw, layout, recipe_data, run, hf_dir)

    first = launch(nproc, recipe, args)
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert {k: resolved["parallel"][k] for k in DEGREES} == layout
    for section, key in (("train", "dtype"), ("parallel", "activation_checkpoint"), ("model", "dropout"),
                         ("parallel", "sequence_parallel"), ("data", "dataset")):
        if key in (raw.get(section) or {}):
            assert resolved[section][key] == raw[section][key], f"{section}.{key}"
    if (raw.get("model") or {}).get("init_from"):
        assert f"initialised from {hf_dir}" in first.stdout
    records = read_metrics(run)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 2, 4]
    assert all(math.isfinite(r.get("loss", r.get("val_loss"))) for r in records)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2", "step_4"]
    assert "sample:\n" in first.stdout

    again = launch(nproc, recipe, [*args, "--train.max_steps=6"])
    assert "step_4 at step 4" in again.stdout
    assert [r["step"] for r in read_metrics(run) if "loss" in r][-2:] == [5, 6]
    assert (run / "checkpoints" / "step_6").is_dir()
    assert "sample:\n" in again.stdout
    if nproc > 1 and recipe in CROSS_CHECKED:  # one process generates from the saved weights what the layout did
        log = resolved["logging"]
        one = run_module("scaling.sample", run, "--prompt", log["sample_prompt"], "--max-new-tokens", 8,
                         "--temperature", log["sample_temperature"], "--top-k", 200,
                         "--seed", resolved["train"]["seed"], check=True)
        if layout["tp"] > 1 and resolved["train"]["dtype"] == "bf16":
            # TP splits matrix multiplies, and bf16 rounds the partial sums: the text may part from one
            # process's after a few tokens (tests/test_generate.py checks TP's text exactly, in fp32).
            assert one.stdout.strip()
        else:
            assert again.stdout.split("sample:\n", 1)[1].startswith(one.stdout.rstrip("\n"))

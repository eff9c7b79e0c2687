"""Recipes and the planner: every recipe builds at its target size; the memory model is checked
against real FSDP shards and a real CPU run's peak memory."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, read_metrics, run_module, tiny_args
from scaling.plan import load_for_world, measure, plan

GPT2 = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}
# recipe: the world size it targets
RECIPES = {"gpt2_124m_ddp": 8, "gpt2_124m_fsdp": 8, "gpt2_350m_fsdp": 8, "gpt2_774m_fsdp": 16,
           "gpt2_xl_fsdp": 32, "gpt2_xl_fsdp_tp": 20, "gpt2_774m_hsdp": 16, "gpt2_xl_hsdp": 32, "gpt2_124m_finetune_owt": 1, "shakespeare_char": 1,
           "cpu_demo": 2}


def test_every_recipe_is_covered():
    assert {p.stem for p in (ROOT / "recipes").glob("*.yaml")} == set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_parses_and_its_batch_arithmetic_is_consistent(name):
    path = ROOT / "recipes" / f"{name}.yaml"
    cfg = load_for_world(str(path), RECIPES[name])
    t, p = cfg.train, cfg.parallel
    assert p.dp_replicate * p.dp_shard * p.tp == RECIPES[name]
    assert t.global_batch_size % (t.micro_batch_size * p.dp_replicate * p.dp_shard) == 0
    # The opening comment states the tokens per step; it must be what the recipe computes.
    stated = re.search(r"([\d,]+) tokens per step", path.read_text())
    assert stated, f"{name}: the opening comment must state the tokens per step"
    assert int(stated.group(1).replace(",", "")) == t.global_batch_size * t.seq_len
    assert "Planner" in path.read_text() or name == "cpu_demo"


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if "xl" in n else n
                                  for n in RECIPES if n.startswith("gpt2")])
def test_gpt2_recipe_builds_at_its_target_world_size_with_gpt2s_parameter_count(name):
    cfg = load_for_world(str(ROOT / "recipes" / f"{name}.yaml"), RECIPES[name])
    cfg.parallel.compile = False
    counts = measure(cfg, RECIPES[name])  # meta device, the recipe's real plan, every rank
    r = plan(cfg, RECIPES[name], "h100", None, 0.4, "cuda")
    padded = GPT2[cfg.model.size] + (cfg.model.vocab_size - 50257) * cfg.model.n_embd  # vocabulary rows added
    assert cfg.model.vocab_size % (64 * cfg.parallel.tp) == 0  # tensor-core-sized on every TP shard
    assert r["parameters"] == padded
    planned = r["memory"]["parameters"] / 4
    assert all(abs(c / planned - 1) < 0.02 for c in counts), (counts, planned)
    if cfg.parallel.tp == 1:
        assert sum(counts) == padded * cfg.parallel.dp_replicate  # each shard held once
    assert r["fits"]


SHARD_PROBE = """
import torch, torch.distributed as dist
from scaling.config import load_config
from scaling.distributed import init
from scaling.optim import build_optimizer
from scaling.parallel import ParallelDims, build_mesh
from scaling.train import build_model
cfg = load_config(None, ARGS)
init("cpu", 120)
p = cfg.parallel
dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp)
mesh, _ = build_mesh(dims, "cpu")
model = build_model(cfg, 50257, dims, mesh, torch.device("cpu"))
opt = build_optimizer(model, cfg.optim)
# Two micro batches, gradients reduced after the second: between them FSDP holds unsharded ones.
model.set_requires_gradient_sync(False)
model(torch.randint(0, 50257, (2, 32))).float().mean().backward()
fsdp_params = [fp for m in [*model.blocks, model] for fp in m._get_fsdp_state()._fsdp_param_group.fsdp_params]
held = sum(x.numel() * x.element_size() for fp in fsdp_params
           for x in (fp.unsharded_accumulated_grad, fp._unsharded_param.grad) if x is not None)
model.set_requires_gradient_sync(True)
model(torch.randint(0, 50257, (2, 32))).float().mean().backward()
opt.step()
local = lambda t: t.to_local() if hasattr(t, "to_local") else t
params = sum(local(q).numel() * 4 for q in model.parameters())
state = sum(local(v).numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k != "step")
with open(f"bytes_rank{dist.get_rank()}.txt", "w") as f:  # files, not stdout: ranks' prints interleave
    f.write(f"{params} {state} {held}")
dist.barrier()  # every rank done before any tears its group down (gloo aborted a rank there)
dist.destroy_process_group()
"""


@pytest.mark.parametrize("n", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_planned_parameter_optimizer_and_accumulation_bytes_match_real_fsdp_shards(n, tmp_path):
    args = ["--model.size=nano", "--model.block_size=256", "--model.vocab_size=50304", "--parallel.dp_shard=-1",
            "--train.dtype=bf16", "--train.micro_batch_size=2", f"--train.global_batch_size={4 * n}"]
    script = tmp_path / "probe.py"
    script.write_text(SHARD_PROBE.replace("ARGS", repr(args)))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                        str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [list(map(int, (tmp_path / f"bytes_rank{r}.txt").read_text().split())) for r in range(n)]
    mem = plan(load_for_world(None, n, args), n, "h100", None, 0.4, "cpu")["memory"]
    for params, state, held in rows:
        assert params == pytest.approx(mem["parameters"], rel=0.02)
        assert state == pytest.approx(mem["optimizer"], rel=0.02)
        assert held == pytest.approx(mem["accumulated_grads"], rel=0.02)  # the whole model's, in fp32
    print(f"FSDP({n}) per rank: planned {mem['parameters'] + mem['optimizer']:,.0f} B + "
          f"{mem['accumulated_grads']:,.0f} B while accumulating, measured", rows)


@pytest.mark.slow
def test_planned_peak_memory_of_a_cpu_run_is_within_20_percent_of_its_peak_rss(data_root, tmp_path):
    """glibc is told to return large freed blocks at once, so that RSS follows the live tensors:
    with its default adaptive threshold, freed blocks stay mapped and the same run's peak RSS
    varied from 1.97 to 2.44 GB between runs."""
    shape = ["--model.size=baby", "--model.block_size=256", "--train.seq_len=256", "--train.micro_batch_size=32"]
    run_module("scaling.train", *tiny_args(data_root, tmp_path, *shape, "--train.max_steps=2", "--logging.every=1",
                                           "--train.eval_every=0", "--checkpoint.async_save=false"), check=True,
               env={"MALLOC_MMAP_THRESHOLD_": "131072"})
    measured = max(r["peak_mem_gb"] for r in read_metrics(tmp_path) if "peak_mem_gb" in r) * 1e9
    cfg = load_for_world(str(ROOT / "tests" / "tiny.yaml"), 1, shape + [f"--data.root={data_root}"])
    predicted = plan(cfg, 1, "h100", None, 0.4, "cpu", vocab_size=257)["total"]
    print(f"CPU run, baby shape, micro batch 32: predicted {predicted / 1e9:.2f} GB, peak RSS {measured / 1e9:.2f} GB")
    assert predicted == pytest.approx(measured, rel=0.2)


@pytest.mark.parametrize("args, message", [
    (["--gpus", "0"], "--gpus: must be >= 1, got 0"),
    (["--gpus=-4"], "--gpus: must be >= 1, got -4"),
    (["--gpus", "8", "--gpu-mem", "lots"], "--gpu-mem: expected a size like 80GB, got 'lots'"),
    (["--gpus", "8", "--gpu-mem", "0GB"], "--gpu-mem: expected a size like 80GB, got '0GB'"),
    (["--gpus", "8", "--mfu", "0"], "--mfu: must be in (0, 1] (a fraction of peak), got 0.0"),
    (["--gpus", "8", "--mfu", "1.5"], "--mfu: must be in (0, 1] (a fraction of peak), got 1.5"),
    (["--gpus", "8", "--vocab-size", "0"], "--vocab-size: must be >= 1, got 0"),
    (["--gpus", "x"], "argument --gpus: invalid int value: 'x'"),
    (["--gpus", "2", "--device", "cpu", "--gpu", "a100"], "--gpu: plans a GPU, but --device cpu plans CPU processes"),
    (["--gpus", "2", "--device", "cpu", "--mfu", "0.5"], "--mfu: plans a GPU, but --device cpu plans CPU processes"),
], ids=["gpus-0", "gpus-negative", "gpu-mem-garbage", "gpu-mem-0", "mfu-0", "mfu-above-1", "vocab-0", "gpus-not-int",
        "cpu-with-gpu", "cpu-with-mfu"])
def test_bad_plan_argument_exits_2_with_one_line_naming_it(args, message, capsys):
    from scaling.plan import main
    with pytest.raises(SystemExit) as e:
        main([str(ROOT / "recipes" / "gpt2_124m_fsdp.yaml"), *args])
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"


# Every collective a rank issues, as bytes sent under the ring model the planner uses: (n-1)/n
# of an all-gather's output or a reduce-scatter's input, twice that of an all-reduce.
COUNT_COLLECTIVES = """
import atexit, inspect, json, os
import torch.distributed as dist
sent = [0.0]
def counted(name, payload, factor):
    call = getattr(dist, name)
    signature = inspect.signature(call)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        n, t = dist.get_world_size(bound.get("group")), bound[payload]
        if n > 1:
            sent[0] += factor * (n - 1) / n * t.numel() * t.element_size()
        return call(*args, **kwargs)
    setattr(dist, name, wrapper)
counted("all_gather_single", "output_tensor", 1)
counted("all_gather_into_tensor", "output_tensor", 1)
counted("reduce_scatter_single", "input", 1)
counted("reduce_scatter_tensor", "input", 1)
counted("all_reduce", "tensor", 2)
atexit.register(lambda: open(os.path.join(os.environ["COUNT_DIR"], os.environ["RANK"]), "w").write(json.dumps(sent[0])))
"""


@pytest.mark.parametrize("layout, nproc", [({"dp_shard": 2, "micro_batch_size": 4}, 2),
                                           pytest.param({"dp_replicate": 2, "dp_shard": 2, "micro_batch_size": 2}, 4,
                                                        marks=pytest.mark.slow)],
                         ids=["fsdp2", "hsdp2x2"])  # 4 processes on 2 cores: 20 s, in the slow tier
def test_planned_traffic_per_step_is_what_fsdp_sends(layout, nproc, data_root, tmp_path):
    """Two micro batches per step: FSDP reduce-scatters once per step, HSDP once per micro batch."""
    from conftest import TINY, run_torchrun
    from scaling.plan import shape_of, traffic
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(COUNT_COLLECTIVES)
    overrides = [f"--{'train' if k == 'micro_batch_size' else 'parallel'}.{k}={v}" for k, v in layout.items()] + [
        "--train.global_batch_size=16",
        "--train.eval_every=0", "--logging.every=100", "--checkpoint.every=100", "--logging.sample_tokens=0"]
    sent = {}
    for steps in (2, 3):  # one step's traffic is the difference: set-up and the final save cancel out
        (tmp_path / f"count{steps}").mkdir()
        run_torchrun(nproc, "scaling.train", *tiny_args(data_root, tmp_path / f"run{steps}", *overrides,
                                                        f"--train.max_steps={steps}"),
                     env={"PYTHONPATH": f"{tmp_path / 'inject'}{os.pathsep}{ROOT}", "COUNT_DIR": str(tmp_path / f"count{steps}")})
        sent[steps] = [float((tmp_path / f"count{steps}" / str(r)).read_text()) for r in range(nproc)]
    measured = [b - a for a, b in zip(sent[2], sent[3])]
    cfg = load_for_world(str(TINY), nproc, [f"--data.root={data_root}", *overrides])
    planned = sum(traffic(cfg, shape_of(cfg, 256), gpus_per_node=8).values())
    assert all(m == pytest.approx(planned, rel=0.01) for m in measured), (measured, planned)


def plan_output(capsys, recipe, *args) -> list[str]:
    from scaling.plan import main
    main([str(ROOT / "recipes" / recipe), *args])
    return capsys.readouterr().out.splitlines()


def params_with_vocab(recipe, vocab_size) -> int:
    import torch
    from scaling.config import model_config
    from scaling.model import GPT
    with torch.device("meta"):
        return GPT(model_config(load_for_world(str(ROOT / "recipes" / recipe), 1), vocab_size)).num_params()


def test_the_planner_counts_the_parameters_of_the_datasets_vocabulary(tmp_path, capsys):
    """A char dataset's vocabulary is its alphabet: only its meta.json knows it (65 for Shakespeare)."""
    import json
    (tmp_path / "shakespeare_char").mkdir()
    chars = "".join(chr(c) for c in range(32, 32 + 65))
    (tmp_path / "shakespeare_char" / "meta.json").write_text(json.dumps(
        {"tokenizer": "char", "vocab_size": 65, "chars": chars, "splits": {}}))
    out = plan_output(capsys, "shakespeare_char.yaml", "--gpus", "1", f"--data.root={tmp_path}")
    assert out[0].startswith(f"shakespeare_char: {params_with_vocab('shakespeare_char.yaml', 65):,} parameters,"), out[0]


def test_an_unprepared_dataset_is_planned_with_its_tokenizers_vocabulary(tmp_path, capsys):
    out = plan_output(capsys, "cpu_demo.yaml", "--gpus", "2", f"--data.root={tmp_path}")  # byte: 257 ids
    assert out[0].startswith(f"cpu_demo: {params_with_vocab('cpu_demo.yaml', 257):,} parameters,"), out[0]


def test_an_unprepared_dataset_is_planned_with_gpt2s_vocabulary_saying_so_first(tmp_path, capsys):
    out = plan_output(capsys, "shakespeare_char.yaml", "--gpus", "1", f"--data.root={tmp_path}")  # char: no size
    assert out[0] == (f"assuming GPT-2's vocabulary of 50,257 tokens: dataset 'shakespeare_char' is not prepared "
                      f"at {tmp_path / 'shakespeare_char'} (prepare it, or pass --vocab-size)")
    assert out[1].startswith(f"shakespeare_char: {params_with_vocab('shakespeare_char.yaml', 50257):,} parameters,")


def test_the_planned_parameter_count_is_what_training_prints(data_root, tmp_path, capsys):
    """tests/tiny.yaml names no tokenizer: the count comes from the prepared dataset (bytes)."""
    from scaling.plan import main
    p = run_module("scaling.train", *tiny_args(data_root, tmp_path, "--train.max_steps=1", "--train.eval_every=0",
                                               "--logging.sample_tokens=0"), check=True)
    trained = re.search(r"model: ([\d,]+) parameters", p.stdout)
    assert trained, p.stdout
    main([str(ROOT / "tests" / "tiny.yaml"), "--gpus", "1", f"--data.root={data_root}"])
    assert capsys.readouterr().out.startswith(f"tiny: {trained.group(1)} parameters,")


def test_cpu_plans_name_no_gpu_and_no_gpu_throughput(tmp_path, capsys):
    from scaling.plan import GPUS, ram_bytes
    out = "\n".join(plan_output(capsys, "cpu_demo.yaml", "--gpus", "2", "--device", "cpu", f"--data.root={tmp_path}"))
    assert "2 CPU processes" in out and f"GB of {ram_bytes() / 1e9:.1f} GB RAM" in out, out
    assert not any(gpu in out for gpu in GPUS) and "MFU" not in out and "tokens/s" not in out, out


def test_cpu_plans_fit_all_processes_of_a_machine_into_its_memory():
    cfg = load_for_world(str(ROOT / "recipes" / "cpu_demo.yaml"), 2)
    one = plan(cfg, 2, "h100", None, 0.4, "cpu", vocab_size=257)["total"]
    room = 1.5 * one / 1e9  # one process fits, two on the machine do not
    assert not plan(cfg, 2, "h100", room, 0.4, "cpu", vocab_size=257)["fits"]
    assert plan(cfg, 2, "h100", room, 0.4, "cpu", vocab_size=257, gpus_per_node=1)["fits"]  # one per machine

"""A run resumed on another number of ranks (a node lost, or more nodes given) keeps its global
batch, and says the change once: a console line and an event in metrics.jsonl."""

import json

from conftest import read_metrics, run_module, run_torchrun, tiny_args

COMMON = ["--train.global_batch_size=8", "--train.eval_every=0", "--checkpoint.every=4", "--logging.every=2",
          "--parallel.timeout_s=60"]


def test_a_run_resumed_on_fewer_ranks_says_so_in_one_line_and_one_metrics_event(data_root, tmp_path):
    args = tiny_args(data_root, tmp_path, *COMMON)
    run_torchrun(2, "scaling.train", *args, "--train.max_steps=4")
    p = run_module("scaling.train", *args, "--train.max_steps=8", check=True)
    said = [line for line in p.stdout.splitlines() if line.startswith("resume: ")]
    assert said == ["resume: world size 2 -> 1 ranks (data-parallel 2 -> 1): 1 -> 2 micro batches of 4 sequences "
                    "per rank and step, global batch of 8 sequences kept", "resume: train.max_steps: 4 -> 8",
                    said[-1]], p.stdout  # the last: what the longer schedule does to the learning rate
    records = read_metrics(tmp_path)
    [event] = [r for r in records if "event" in r]
    assert {k: v for k, v in event.items() if k != "elapsed_s"} == {
        "step": 4, "event": "world_size", "world_size_from": 2, "world_size": 1, "dp_from": 2, "dp": 1,
        "accumulation_from": 1, "accumulation": 2, "micro_batch_size_from": 4, "micro_batch_size": 4,
        "global_batch_size_from": 8, "global_batch_size": 8}
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4, 6, 8] and all(r["tokens"] == r["step"] * 8 * 64 for r in steps)
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[2])["event"] == "world_size"  # in order


def test_a_run_resumed_on_the_same_ranks_records_no_world_size_event(data_root, tmp_path):
    args = tiny_args(data_root, tmp_path, *COMMON)
    run_module("scaling.train", *args, "--train.max_steps=4", check=True)
    p = run_module("scaling.train", *args, "--train.max_steps=8", check=True)
    assert "world size" not in p.stdout and not [r for r in read_metrics(tmp_path) if "event" in r]

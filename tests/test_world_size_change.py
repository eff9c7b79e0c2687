"""A run resumed on another number of ranks (a node lost, or more nodes given) keeps its global
batch, and says the change once: a console line and an event in metrics.jsonl."""

import pytest
import yaml

from conftest import TINY, read_metrics, run_module, run_torchrun, tiny_args

# fp32 (tiny.yaml's default on CPU), so that the resumed losses can match the uninterrupted run's.
COMMON = ["--train.global_batch_size=8", "--train.eval_every=0", "--checkpoint.every=4", "--logging.every=2",
          "--parallel.timeout_s=60"]


def test_a_run_resumed_on_fewer_ranks_says_so_once_and_trains_on_as_if_uninterrupted(data_root, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_torchrun(2, "scaling.train", *tiny_args(data_root, whole, *COMMON), "--train.max_steps=8")
    p = run_module("scaling.train", *tiny_args(data_root, resumed, *COMMON), "--train.max_steps=8",
                   f"--checkpoint.resume={whole / 'checkpoints' / 'step_4'}", check=True)
    # One line for the ranks, the data-parallel size and the micro batches (not one per parallel.* key).
    said = [line for line in p.stdout.splitlines() if line.startswith("resume: ")]
    assert said == ["resume: world size 2 -> 1 ranks (data-parallel 2 -> 1): 1 -> 2 micro batches of 4 sequences "
                    "per rank and step, global batch of 8 sequences kept"], p.stdout
    first, *steps = read_metrics(resumed)
    assert {k: v for k, v in first.items() if k != "elapsed_s"} == {
        "step": 4, "event": "world_size", "world_size_from": 2, "world_size": 1, "dp_from": 2, "dp": 1,
        "accumulation_from": 1, "accumulation": 2, "micro_batch_size_from": 4, "micro_batch_size": 4,
        "global_batch_size_from": 8, "global_batch_size": 8}
    before = {r["step"]: r for r in read_metrics(whole) if "loss" in r}
    assert [r["step"] for r in steps] == [6, 8]
    assert [r["tokens"] for r in steps] == [before[6]["tokens"], before[8]["tokens"]] == [6 * 8 * 64, 8 * 8 * 64]
    assert [r["loss"] for r in steps] == pytest.approx([before[6]["loss"], before[8]["loss"]], rel=1e-5)


def test_a_run_resumed_on_the_same_ranks_records_no_world_size_event(data_root, tmp_path):
    args = tiny_args(data_root, tmp_path, *COMMON)
    run_module("scaling.train", *args, "--train.max_steps=4", check=True)
    p = run_module("scaling.train", *args, "--train.max_steps=8", check=True)
    assert "world size" not in p.stdout and not [r for r in read_metrics(tmp_path) if "event" in r]


def test_print_config_on_more_ranks_gives_the_micro_batch_that_divides_and_says_so_once_on_stderr():
    # 12 sequences over 2 ranks are 6 each, which micro batches of 4 do not divide: 3 do.
    p = run_module("scaling.train", TINY, "--train.global_batch_size=12", "--train.micro_batch_size=4",
                   "--print-config", "--world", "2", check=True)
    assert p.stderr == ("warning: train.micro_batch_size 4 does not divide the 6 sequences per rank of "
                        "train.global_batch_size=12 over 2 data-parallel ranks: using 3 (2 micro batches per step)\n")
    train = yaml.safe_load(p.stdout)["train"]  # stdout stays the YAML a run's config.yaml holds
    assert (train["global_batch_size"], train["micro_batch_size"]) == (12, 3)


def test_a_hand_edited_checkpoint_config_without_the_layout_gives_no_world_size_change(tmp_path):
    from scaling.checkpoint import world_size_change
    from scaling.config import load_config
    (tmp_path / "config.yaml").write_text("train:\n  micro_batch_size: 4\n")  # no parallel section
    assert world_size_change(tmp_path, load_config(TINY, [], world=1)) is None

"""Recipes and the command line: overrides, resolution, and one-line errors for bad input."""

import pytest
import yaml

from conftest import ROOT, TINY, run_module
from scaling.config import ConfigError, load_config

DEMO = ROOT / "recipes" / "cpu_demo.yaml"


def assert_cli_error(args, *fragments):
    """scaling.train exits 2 with a single 'error: ...' line naming what is wrong."""
    p = run_module("scaling.train", *args, timeout=120)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert "Traceback" not in p.stderr


def test_unknown_key_names_the_nearest_valid_key():
    assert_cli_error([DEMO, "--model.n_layr=3"], "model.n_layr", "did you mean model.n_layer?")


def test_wrong_type_names_the_key_and_expected_type():
    assert_cli_error([DEMO, "--train.max_steps=ten"], "train.max_steps", "expected int", "'ten'")


def test_missing_recipe_file_is_reported():
    assert_cli_error(["recipes/no_such_recipe.yaml"], "recipe not found", "no_such_recipe.yaml")


def test_n_embd_not_divisible_by_n_head_is_rejected():
    assert_cli_error([DEMO, "--model.n_head=3"], "model.n_embd", "not divisible", "n_head=3")


def test_a_micro_batch_that_does_not_divide_a_ranks_share_gives_way_to_the_largest_that_does(capsys):
    # The flagship recipe after losing one node of four (32 -> 24 GPUs): 480 / 24 = 20 sequences
    # per rank, which micro batches of 15 do not divide; the global batch, and so the run, stays.
    cfg = load_config(ROOT / "recipes" / "gpt2_124m_fsdp.yaml", [], world=24)
    assert (cfg.train.global_batch_size, cfg.train.micro_batch_size) == (480, 10)
    assert capsys.readouterr().err == ("warning: train.micro_batch_size 15 does not divide the 20 sequences per rank "
                                       "of train.global_batch_size=480 over 24 data-parallel ranks: using 10 "
                                       "(2 micro batches per step)\n")
    assert load_config(DEMO, ["--train.global_batch_size=20", "--train.micro_batch_size=8"]).train.micro_batch_size == 5


def test_only_rank_0_says_that_the_micro_batch_gave_way(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert load_config(ROOT / "recipes" / "gpt2_124m_fsdp.yaml", [], world=24).train.micro_batch_size == 10
    assert capsys.readouterr().err == ""


def test_a_global_batch_that_does_not_split_over_the_ranks_names_the_global_batches_that_do():
    with pytest.raises(ConfigError) as e:  # 7 GPUs left of 8
        load_config(ROOT / "recipes" / "gpt2_124m_fsdp.yaml", [], world=7)
    assert str(e.value) == ("train.global_batch_size: 480 sequences do not split over 7 data-parallel ranks; "
                            "use a global batch of 420 or 525")
    assert_cli_error([DEMO, "--train.global_batch_size=9", "--train.micro_batch_size=3", "--print-config", "--world", "2"],
                     "error: train.global_batch_size: 9 sequences do not split over 2 data-parallel ranks; "
                     "use a global batch of 6 or 12")


def test_unknown_section_in_recipe_file_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle:\n  n_layer: 2\n")
    assert_cli_error([bad], "modle", "did you mean model?")


def test_choice_outside_the_allowed_values_is_rejected():
    assert_cli_error([DEMO, "--train.dtype=fp8"], "train.dtype", "fp32, bf16")


def test_unknown_dataset_names_its_prepare_command(tmp_path):
    assert_cli_error([DEMO, f"--data.root={tmp_path}", "--data.dataset=openwebtext"],
                     "openwebtext", "data/openwebtext/prepare.py")


def test_overrides_take_yaml_scalars():
    cfg = load_config(TINY, ["--optim.lr=6e-4", "--model.dropout", "0.1", "--parallel.compile=true",
                             "--train.seq_len=null"])
    assert cfg.optim.lr == 6e-4 and cfg.model.dropout == 0.1 and cfg.parallel.compile is True
    assert cfg.train.seq_len == cfg.model.block_size


def test_ints_are_accepted_for_float_keys_but_not_bools_for_ints():
    assert load_config(TINY, ["--optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match="train.max_steps: expected int"):
        load_config(TINY, ["--train.max_steps=true"])


def test_size_fills_the_shape_and_explicit_keys_win():
    cfg = load_config(TINY, ["--model.size=gpt2", "--model.n_layer=2"])
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (2, 12, 768)


def test_seq_len_longer_than_block_size_is_rejected():
    with pytest.raises(ConfigError, match="train.seq_len: 128 exceeds model.block_size=64"):
        load_config(TINY, ["--train.seq_len=128"])


def test_run_dir_defaults_to_runs_slash_recipe_name():
    assert load_config(DEMO).logging.run_dir == "runs/cpu_demo"


def test_resolved_config_is_written_and_loads_back(tmp_path):
    from scaling.config import save_config
    cfg = load_config(DEMO, ["--train.max_steps=7"])
    save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]["n_layer"] == 4
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_help_lists_every_key_with_its_documentation():
    p = run_module("scaling.train", "--help", timeout=120)
    assert p.returncode == 0
    assert "train.micro_batch_size (int, default 12): sequences per forward/backward" in p.stdout


# Values that type-check but cannot be meant: each is refused naming its key, before any run.
OUT_OF_RANGE = {
    "--optim.lr=-1e-3": "optim.lr",
    "--optim.min_lr=-1": "optim.min_lr",
    "--optim.beta1=-0.1": "optim.beta1",
    "--optim.beta2=1.0": "optim.beta2",
    "--optim.eps=0": "optim.eps",
    "--optim.weight_decay=-0.1": "optim.weight_decay",
    "--optim.decay_steps=-5": "optim.decay_steps",
    "--train.grad_clip=-1": "train.grad_clip",  # would flip every gradient: gradient ascent
    "--train.spike_zscore=-2": "train.spike_zscore",
    "--train.spike_window=0": "train.spike_window",
    "--parallel.timeout_s=0": "parallel.timeout_s",
    "--data.workers=-1": "data.workers",
    "--data.prefetch_steps=0": "data.prefetch_steps",
    "--logging.profile_steps=abc": "logging.profile_steps",
    "--logging.profile_steps=12-10": "logging.profile_steps",
    "--logging.profile_steps=0": "logging.profile_steps",
}


@pytest.mark.parametrize("override", list(OUT_OF_RANGE))
def test_out_of_range_value_is_rejected_naming_its_key(override):
    with pytest.raises(ConfigError, match=OUT_OF_RANGE[override].replace(".", r"\.") + ":"):
        load_config(TINY, [override])


def test_negative_grad_clip_exits_2_with_one_line():
    assert_cli_error([TINY, "--train.grad_clip=-1"], "train.grad_clip", ">= 0")


def test_help_anywhere_on_the_line_prints_the_keys():
    p = run_module("scaling.train", DEMO, "--train.max_steps=3", "--help", timeout=120)
    assert p.returncode == 0 and "optim.beta2" in p.stdout, p.stderr


def test_bare_unknown_flag_is_named_as_an_unknown_key():
    assert_cli_error([DEMO, "--foo"], "foo: unknown key")


def test_help_with_a_recipe_shows_its_values_and_where_each_came_from():
    p = run_module("scaling.train", DEMO, "--train.eval_every=50", "--help", env={"WORLD_SIZE": "1"}, timeout=120)
    assert p.returncode == 0, p.stderr
    for line in ("train.max_steps (int) = 500  [recipe]: optimizer steps to train for",
                 "train.eval_every (int) = 50  [override]: ",
                 "train.seed (int) = 1337  [default]: ",
                 "logging.run_dir (str | None) = 'runs/cpu_demo'  [derived]: ",
                 "parallel.dp_shard (int) = 1  [derived from recipe -1]: "):
        assert "\n  " + line in p.stdout, line


def test_help_with_a_bad_recipe_is_one_error_line():
    assert_cli_error([DEMO, "--model.n_layr=3", "--help"], "model.n_layr", "did you mean model.n_layer?")


def test_print_config_prints_the_resolved_recipe_and_reads_back_the_same(tmp_path):
    run_dir = tmp_path / "run"
    args = ["--train.max_steps=7", f"--logging.run_dir={run_dir}"]
    p = run_module("scaling.train", DEMO, *args, "--print-config", env={"WORLD_SIZE": "1"}, timeout=120)
    assert p.returncode == 0, p.stderr
    printed = tmp_path / "printed.yaml"
    printed.write_text(p.stdout)
    assert load_config(printed) == load_config(DEMO, args)
    assert not run_dir.exists()  # nothing started


def test_print_config_resolves_the_layout_for_the_world_given():
    p = run_module("scaling.train", DEMO, "--print-config", "--world", "2", timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == f"# {DEMO}, resolved for 2 processes"
    assert yaml.safe_load(p.stdout)["parallel"]["dp_shard"] == 2


def test_world_is_refused_outside_print_config_and_help():
    assert_cli_error([DEMO, "--world=2"], "--world", "only with --print-config or --help")


def test_a_bad_key_is_reported_by_rank_0_alone_and_every_rank_exits_2():
    follower = run_module("scaling.train", DEMO, "--model.n_layr=3", env={"RANK": "1", "WORLD_SIZE": "2"}, timeout=120)
    assert (follower.returncode, follower.stderr) == (2, ""), follower.stderr
    leader = run_module("scaling.train", DEMO, "--model.n_layr=3", env={"RANK": "0", "WORLD_SIZE": "2"}, timeout=120)
    assert leader.returncode == 2
    assert leader.stderr.splitlines() == ["error: model.n_layr: unknown key (did you mean model.n_layer?)"]

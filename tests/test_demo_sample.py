"""The demo ends with readable text: recipes/cpu_demo.yaml trained in full as `make demo` trains it
(FSDP over 2 CPU processes, the embedded corpus prepared on first use), then sampled with the
recipe's own settings. A model stuck on one character (the old closing sample was one line of code
and 279 spaces) shows as a long run of it, which the stdlib's own source almost never has (fewer
than a thousand runs over 40 characters in its 10.6M bytes, none over 66)."""

import itertools

import pytest

from conftest import ROOT, run_module, run_torchrun
from scaling.config import load_config

DEMO = ROOT / "recipes" / "cpu_demo.yaml"
SEEDS = 5
LONGEST = 40


def longest_run(text: str) -> int:
    return max((len(list(same)) for _, same in itertools.groupby(text)), default=0)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The trained demo's run folder and what training printed (with -s, printed here too)."""
    tmp = tmp_path_factory.mktemp("demo")
    run = tmp / "run"
    p = run_torchrun(2, "scaling.train", DEMO, f"--data.root={tmp / 'data'}", f"--logging.run_dir={run}",
                     timeout=1800)  # about 4.5 minutes alone on 2 cores, up to 11 on a shared machine
    print(p.stdout)
    return run, p.stdout


@pytest.mark.slow
def test_the_demo_closing_sample_has_no_run_of_more_than_40_identical_characters(demo):
    _, out = demo
    sample = out.split("sample:\n", 1)[1].split("\ndone: step", 1)[0]
    assert longest_run(sample) <= LONGEST, sample


@pytest.mark.slow
def test_the_demo_samples_over_5_seeds_have_no_run_of_more_than_40_identical_characters(demo):
    run, _ = demo
    cfg = load_config(DEMO)
    log = cfg.logging
    p = run_module("scaling.sample", run, "--prompt", log.sample_prompt, "--temperature", log.sample_temperature,
                   "--max-new-tokens", log.sample_tokens, "--top-k", 200,  # the closing sample's top-k
                   "--seed", cfg.train.seed, "--num-samples", SEEDS, check=True)  # seeds train.seed and the 4 after
    samples = p.stdout.split("\n" + "-" * 40 + "\n")
    assert len(samples) == SEEDS, p.stdout
    runs = [longest_run(s) for s in samples]
    assert max(runs) <= LONGEST, f"longest runs per seed {runs}:\n" + "\n\n".join(samples)

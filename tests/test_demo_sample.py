"""The demo ends with readable text: recipes/cpu_demo.yaml trained in full as `make demo` trains it
(FSDP over 2 CPU processes, the embedded corpus prepared on first use), then sampled with the
recipe's own settings. A model stuck on one character (the old closing sample was one line of code
and 279 spaces) shows as a run of it longer than any the corpus it learned from has: the stdlib's
own source (11.0M bytes on 3.11) has runs of spaces up to 66 long (581 of them over 40: aligned
continuation lines), of '#' up to 80, and so on; a sample may reproduce those, not outgrow them."""

import itertools
import re

import pytest

from conftest import ROOT, run_module, run_torchrun
from scaling.config import load_config
from scaling.prepare import stdlib_files

DEMO = ROOT / "recipes" / "cpu_demo.yaml"
SEEDS = 5
SHORT = 20  # runs this long are everywhere (indentation); only longer ones are compared


@pytest.fixture(scope="module")
def corpus_longest() -> dict[str, int]:
    """The longest run of each character in the embedded corpus, for characters with runs over SHORT."""
    longest = {}
    for path in stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace")  # as prepare_embedded reads it
        for m in re.finditer(r"(.)\1{%d,}" % SHORT, text, re.S):
            longest[m.group(1)] = max(longest.get(m.group(1), 0), len(m.group(0)))
    return longest


def runs_beyond(text: str, longest: dict[str, int]) -> list[tuple[str, int]]:
    """Each run in text longer than the corpus's longest run of its character (and than SHORT)."""
    runs = ((c, len(list(same))) for c, same in itertools.groupby(text))
    return [(c, n) for c, n in runs if n > max(SHORT, longest.get(c, 0))]


def test_a_run_longer_than_the_corpus_has_is_found_and_one_it_has_is_not():
    longest = {" ": 66}
    assert runs_beyond("x = (1,\n" + " " * 66 + "2)", longest) == []
    assert runs_beyond("def f():\n" + " " * 279, longest) == [(" ", 279)]
    assert runs_beyond("e" * 21, longest) == [("e", 21)]  # a character never repeated that long


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
def test_the_demo_closing_sample_has_no_run_longer_than_the_corpus_has(demo, corpus_longest):
    _, out = demo
    sample = out.split("sample:\n", 1)[1].split("\ndone: step", 1)[0]
    assert runs_beyond(sample, corpus_longest) == [], sample


@pytest.mark.slow
def test_the_demo_samples_over_5_seeds_have_no_run_longer_than_the_corpus_has(demo, corpus_longest):
    run, _ = demo
    cfg = load_config(DEMO)
    log = cfg.logging
    p = run_module("scaling.sample", run, "--prompt", log.sample_prompt, "--temperature", log.sample_temperature,
                   "--max-new-tokens", log.sample_tokens, "--top-k", 200,  # the closing sample's top-k
                   "--seed", cfg.train.seed, "--num-samples", SEEDS, check=True)  # seeds train.seed and the 4 after
    samples = p.stdout.split("\n" + "-" * 40 + "\n")
    assert len(samples) == SEEDS, p.stdout
    beyond = [runs_beyond(s, corpus_longest) for s in samples]
    assert beyond == [[]] * SEEDS, f"runs beyond the corpus's per seed {beyond}:\n" + "\n\n".join(samples)

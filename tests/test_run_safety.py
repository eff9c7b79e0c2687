"""What a run does off the happy path: it refuses to mix two runs or two models, verifies every
checkpoint before trusting it, never deletes good work, holds its run folder alone, and ends
when another rank dies or hangs, always with one line saying why."""

import contextlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from conftest import TINY, read_metrics, run_module, tiny_args
from scaling.checkpoint import MANIFEST, checkpoints, newest_complete, problem, step_of
from scaling.weights import load_model
from scaling.config import load_config
from scaling.guards import SpikeGuard
from scaling.train import train
from test_checkpoint import command, kill_all, losses_by_step, run, start, worker_pid

FAST = ["--train.eval_every=0", "--logging.every=1"]


def snapshot(folder: Path) -> dict:
    """Every file under folder with its bytes and modification time."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def train_cli(data_root, run_dir, *extra, **kw):
    return run_module("scaling.train", *tiny_args(data_root, run_dir, *FAST, *extra), **kw)


def train_here(data_root, run_dir, *extra):
    """scaling.train's train() in this process: the same run without an interpreter start-up."""
    train(load_config(TINY, [f"--data.root={data_root}", f"--logging.run_dir={run_dir}", *FAST, *extra]))


def one_line_error(p, code=2) -> str:
    assert p.returncode == code, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in p.stderr, p.stderr
    return lines[0]


def flip_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def saved_run(data_root, tmp_path_factory):
    """A 4-step run of tests/tiny.yaml with checkpoints at steps 2 and 4 (copy it before changing it)."""
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    train_here(data_root, run_dir, "--train.max_steps=4", "--checkpoint.every=2")
    return run_dir


@pytest.fixture
def run_copy(saved_run, tmp_path):
    shutil.copytree(saved_run, tmp_path / "run")
    return tmp_path / "run"


# --- a resumed run is the same run ---------------------------------------------------------

SHAPE_CHANGES = {  # override: what the refusal names (the checkpoint's value -> the new one)
    "--model.n_layer=3": "model.n_layer: 2 -> 3",
    "--model.n_head=4": "model.n_head: 2 -> 4",  # same tensor shapes: only the config tells
    "--model.n_embd=128": "model.n_embd: 64 -> 128",
    "--model.block_size=128": "model.block_size: 64 -> 128",
    "--model.vocab_size=320": "model.vocab_size: 257 -> 320",
    "--model.bias=false": "model.bias: True -> False",
}


@pytest.mark.parametrize("override", list(SHAPE_CHANGES))
def test_resume_refuses_a_model_change_and_leaves_the_run_folder_as_it_was(override, run_copy, data_root):
    before = snapshot(run_copy)
    cfg = load_config(TINY, [f"--data.root={data_root}", f"--logging.run_dir={run_copy}", *FAST,
                             "--train.max_steps=6", override])
    from scaling.config import ConfigError
    with pytest.raises(ConfigError, match="checkpoint.resume") as e:
        train(cfg)
    assert SHAPE_CHANGES[override] in str(e.value) and "\n" not in str(e.value)
    assert snapshot(run_copy) == before


def test_resume_refusal_on_the_command_line_is_one_line_naming_each_key(run_copy, data_root):
    before = snapshot(run_copy)
    p = train_cli(data_root, run_copy, "--train.max_steps=6", "--model.n_layer=3", "--model.n_head=1")
    line = one_line_error(p)
    assert "model.n_layer: 2 -> 3" in line and "model.n_head: 2 -> 1" in line
    assert snapshot(run_copy) == before


def test_legitimate_changes_on_resume_are_reported_one_line_each(run_copy, data_root, capsys):
    train_here(data_root, run_copy, "--train.max_steps=6", "--optim.lr=2e-3", "--checkpoint.every=2")
    out = capsys.readouterr().out
    assert "resume: optim.lr: 0.001 -> 0.002" in out
    assert "resume: train.max_steps: 4 -> 6" in out
    assert "step_4 at step 4" in out


# --- checkpoint integrity ----------------------------------------------------------------------

def test_every_checkpoint_file_has_a_recorded_checksum(saved_run):
    ck = saved_run / "checkpoints" / "step_4"
    files = json.loads((ck / MANIFEST).read_text())["files"]
    assert set(files) == {f.name for f in ck.iterdir()} - {MANIFEST}
    assert {"rng_rank0.pt", ".metadata", "config.yaml"} <= set(files)


def test_a_flipped_byte_in_a_full_length_shard_is_caught_and_the_older_checkpoint_used(run_copy, data_root,
                                                                                         capsys):
    step4 = run_copy / "checkpoints" / "step_4"
    shard = next(step4.glob("*.distcp"))
    flip_byte(shard)
    damaged = shard.read_bytes()
    train_here(data_root, run_copy, "--train.max_steps=5")
    out = capsys.readouterr().out
    assert f"skipping {step4}: checksum mismatch in {shard.name}" in out
    assert "step_2 at step 2" in out
    assert shard.read_bytes() == damaged  # left on disk as it was, for a post-mortem


def test_a_missing_rng_file_is_reported_as_missing(run_copy, data_root, capsys):
    (run_copy / "checkpoints" / "step_4" / "rng_rank0.pt").unlink()
    train_here(data_root, run_copy, "--train.max_steps=5")
    out = capsys.readouterr().out
    assert "step_4: missing rng_rank0.pt" in out and "step_2 at step 2" in out


def test_sample_refuses_a_checkpoint_whose_checksum_does_not_match(run_copy):
    flip_byte(next((run_copy / "checkpoints" / "step_4").glob("*.distcp")))
    s = run_module("scaling.sample", run_copy / "checkpoints" / "step_4")
    assert "checksum mismatch" in one_line_error(s)


# --- clean-up never deletes good work ------------------------------------------------------

def test_a_damaged_newer_checkpoint_is_set_aside_never_counted_nor_overwritten(run_copy, data_root):
    step4 = run_copy / "checkpoints" / "step_4"
    flip_byte(next(step4.glob("*.distcp")))
    damaged = snapshot(step4)
    train_here(data_root, run_copy, "--train.max_steps=6", "--checkpoint.every=2", "--checkpoint.keep=1")
    aside = run_copy / "checkpoints" / "step_4.damaged"
    assert {p.name: v for p, v in snapshot(aside).items()} == {p.name: v[0:1] + v[1:] for p, v in damaged.items()}
    assert [p.name for p in checkpoints(run_copy)] == ["step_6"]


def test_clean_up_leaves_a_damaged_older_checkpoint_in_place_instead_of_deleting_it(run_copy, data_root, capsys):
    # step_2 is past checkpoint.keep=1 once step_6 is saved: a size check alone would delete it.
    step2 = run_copy / "checkpoints" / "step_2"
    shard = next(step2.glob("*.distcp"))
    flip_byte(shard)
    damaged = snapshot(step2)
    train_here(data_root, run_copy, "--train.max_steps=6", "--checkpoint.every=2", "--checkpoint.keep=1")
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["step_2", "step_6"]
    assert snapshot(step2) == damaged
    assert capsys.readouterr().out.count(f"checkpoint: {step2} is damaged (checksum mismatch in {shard.name}") == 1
    assert problem(run_copy / "checkpoints" / "step_6", verify=True) is None


def test_a_damaged_newest_checkpoint_is_not_counted_so_keep_2_keeps_the_good_older_one(run_copy, data_root):
    # The resume falls back to step_2 and saves step_3 below the damaged step_4: counting step_4
    # as one of the 2 kept would delete step_2, the only good checkpoint besides the new one.
    step2 = run_copy / "checkpoints" / "step_2"
    flip_byte(next((run_copy / "checkpoints" / "step_4").glob("*.distcp")))
    good = snapshot(step2)
    train_here(data_root, run_copy, "--train.max_steps=3", "--checkpoint.keep=2")
    assert [p.name for p in checkpoints(run_copy)] == ["step_2", "step_3", "step_4"]  # step_4 left in place
    assert snapshot(step2) == good


def test_clean_up_never_counts_nor_deletes_another_runs_checkpoints(run_copy, data_root):
    # step_2 stands for a checkpoint copied in from another run: its checksums.json names that run.
    step2 = run_copy / "checkpoints" / "step_2"
    manifest = json.loads((step2 / MANIFEST).read_text())
    (step2 / MANIFEST).write_text(json.dumps({**manifest, "run": "another run"}))
    theirs = snapshot(step2)
    train_here(data_root, run_copy, "--train.max_steps=6", "--checkpoint.every=2", "--checkpoint.keep=1")
    assert [p.name for p in checkpoints(run_copy)] == ["step_2", "step_6"]  # this run's step_4 deleted
    assert snapshot(step2) == theirs


def test_keep_1_never_deletes_the_checkpoint_just_written(run_copy, data_root):
    # Resume explicitly from the older step 2 while step 4 exists: the new step 3 is older than
    # step 4, yet it is the one this run just wrote.
    train_here(data_root, run_copy, "--train.max_steps=3", "--checkpoint.keep=1",
               f"--checkpoint.resume={run_copy / 'checkpoints' / 'step_2'}")
    assert [p.name for p in checkpoints(run_copy)] == ["step_3", "step_4"]


def test_a_fresh_run_refuses_a_folder_that_holds_another_run(run_copy, data_root):
    before = snapshot(run_copy)
    line = one_line_error(train_cli(data_root, run_copy, "--checkpoint.resume=none"))
    assert "logging.run_dir" in line and "already holds a run" in line
    assert snapshot(run_copy) == before


def test_a_fresh_run_refuses_a_folder_that_holds_only_another_runs_metrics(run_copy, data_root):
    shutil.rmtree(run_copy / "checkpoints")  # its checkpoints moved away: its metrics.jsonl still says it ran
    before = snapshot(run_copy)
    line = one_line_error(train_cli(data_root, run_copy, "--checkpoint.resume=none"))
    assert "logging.run_dir" in line and "already holds a run (metrics.jsonl)" in line, line
    assert snapshot(run_copy) == before


# --- one run per run folder --------------------------------------------------------------------

def test_a_second_run_on_the_same_folder_is_refused_naming_the_holder(data_root, tmp_path):
    first = start(command("single", data_root, tmp_path, "--train.max_steps=100000", "--logging.every=1"))
    try:
        while not (tmp_path / "metrics.jsonl").is_file():
            assert first.poll() is None
            time.sleep(0.05)
        line = one_line_error(train_cli(data_root, tmp_path))
        assert "is in use by a running run" in line and f"pid {first.pid}" in line
    finally:
        kill_all(first)
    # The holder died without cleaning up: its lock went with it.
    p = train_cli(data_root, tmp_path, "--train.max_steps=2", "--checkpoint.resume=auto")
    assert p.returncode == 0, p.stderr


# --- a hung or dead rank ends the job ------------------------------------------------------

@pytest.mark.slow  # ~20 s; the Slurm frozen-rank job (tests/test_launch.py) is in the slow tier too
def test_a_stopped_rank_ends_the_others_within_the_timeout_even_with_a_save_in_flight(data_root, tmp_path):
    timeout_s = 10
    p = start(command("fsdp2", data_root, tmp_path, "--train.max_steps=100000", "--checkpoint.every=1",
                      "--checkpoint.keep=2", f"--parallel.timeout_s={timeout_s}", "--logging.every=1"))
    stopped = None
    try:
        root = tmp_path / "checkpoints"
        deadline = time.time() + 120
        # SIGSTOP rank 1 while a background save is in flight (a .tmp folder exists).
        while stopped is None:
            assert p.poll() is None and time.time() < deadline
            if len(checkpoints(tmp_path)) >= 2 and list(root.glob("step_*.tmp")):
                r0, stopped = worker_pid(p.pid, 0), worker_pid(p.pid, 1)
                os.kill(stopped, signal.SIGSTOP)
        t0 = time.time()
        while Path(f"/proc/{r0}").exists() and Path(f"/proc/{r0}/stat").read_text().split()[2] != "Z":
            assert time.time() - t0 < 120, "rank 0 is still running"  # a hang bound, not a speed claim
            time.sleep(0.1)
        out, _ = p.communicate(timeout=120)
    finally:
        if stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGKILL)
    assert p.returncode != 0
    assert "another rank died or hung past parallel.timeout_s" in out
    # The failing rank killed its stopped sibling: torchrun did not wait out its SIGTERM grace on it.
    assert "Unable to shutdown process" not in out and "forcefully exiting via" not in out, out[-3000:]
    load_model(newest_complete(tmp_path))  # the newest complete checkpoint still loads


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def test_a_run_in_this_process_gives_back_the_signal_handlers_it_found(data_root, tmp_path, monkeypatch):
    """A notebook or a test calls train() in-process: the run's SIGTERM handler must not outlive
    it (forked children inherit it, and then SIGTERM, multiprocessing's way to stop them, cannot)."""
    mine = lambda *_: None  # noqa: E731
    previous = {s: signal.signal(s, mine) for s in STOP_SIGNALS}
    try:
        train_here(data_root, tmp_path / "ok", "--train.max_steps=2")
        assert all(signal.getsignal(s) is mine for s in STOP_SIGNALS)
        import scaling.train
        monkeypatch.setattr(scaling.train, "INJECT_NONFINITE_STEP", 1)
        with pytest.raises(Exception, match="non-finite"):  # a run that ends in an error gives them back too
            train_here(data_root, tmp_path / "nan", "--train.max_steps=2", "--train.on_nonfinite=stop")
        assert all(signal.getsignal(s) is mine for s in STOP_SIGNALS)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def alive(pid) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_workers_whose_torchrun_is_killed_save_a_step_and_stop_instead_of_training_on(data_root, tmp_path):
    """torchrun starts its workers in sessions of their own: a SIGKILL of torchrun alone (the OOM
    killer, kill -9 of the launcher) reaches none of them. They ask Linux for SIGTERM when their
    parent dies, so they save at a step boundary and exit, and the run folder is free again."""
    p = start(command("fsdp2", data_root, tmp_path, "--train.max_steps=100000", "--logging.every=1",
                      "--checkpoint.every=100000"))
    workers = []
    try:
        deadline = time.time() + 120
        while sum("loss" in r for r in read_metrics(tmp_path)) < 3 if (tmp_path / "metrics.jsonl").is_file() else True:
            assert p.poll() is None and time.time() < deadline
            time.sleep(0.05)
        workers = [worker_pid(p.pid, r) for r in (0, 1)]
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        deadline = time.time() + 120  # a bound for a regression (orphans train on), not a speed claim
        while any(alive(w) for w in workers):
            assert time.time() < deadline, "the workers trained on after torchrun died"
            time.sleep(0.1)
    finally:
        for w in [p.pid, *workers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)
    out = p.stdout.read()
    assert "SIGTERM: saved step" in out and "Traceback" not in out, out[-3000:]
    saved = step_of(checkpoints(tmp_path)[-1])
    rc, out = run(command("single", data_root, tmp_path, f"--train.max_steps={saved + 1}"))
    assert rc == 0 and f"at step {saved}" in out, out[-3000:]


# --- the run folder: a file, read-only, full ---------------------------------------------------

def test_a_run_dir_that_is_a_file_is_one_line(data_root, tmp_path):
    (tmp_path / "f").write_text("x")
    assert "is a file" in one_line_error(train_cli(data_root, tmp_path / "f"))


def test_a_read_only_run_folder_is_one_line(data_root, tmpfs):
    point = tmpfs("ro,size=1m")
    line = one_line_error(train_cli(data_root, point / "run"))
    assert "cannot write to" in line and "read-only" in line


def test_disk_full_says_so_and_keeps_the_previous_checkpoint(data_root, tmpfs):
    point = tmpfs("size=6m")  # a checkpoint of the tiny model with its optimizer is ~1.9 MB
    run_dir = point / "run"
    line = one_line_error(train_cli(data_root, run_dir, "--train.max_steps=50", "--checkpoint.every=1",
                                    "--checkpoint.keep=0"), code=1)  # a failure, not bad input
    assert "no space left on device" in line
    newest = newest_complete(run_dir, report=lambda *_: None)
    assert newest is not None and not list((run_dir / "checkpoints").glob("*.tmp"))
    load_model(newest)


# --- bad input caught before training ----------------------------------------------------------

def char_dataset(out: Path, text: str):
    """A character-level dataset of text (its alphabet: the characters it uses, sorted)."""
    from scaling.prepare import SplitWriter, write_meta
    from scaling.tokenizer import CharTokenizer
    tok = CharTokenizer("".join(sorted(set(text))))
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split in ("train", "val"):
        w = SplitWriter(out, split, tok.vocab_size)
        w.write(tok.encode(text))
        splits[split] = w.close()
    write_meta(out, tok, splits, source="test", chars=tok.chars)


def test_a_sample_prompt_the_tokenizer_cannot_encode_is_refused_before_training(tmp_path):
    char_dataset(tmp_path / "data" / "chars", "abcde fghij\n" * 200)
    p = run_module("scaling.train", TINY, f"--data.root={tmp_path / 'data'}", "--data.dataset=chars",
                   f"--logging.run_dir={tmp_path / 'run'}", "--logging.sample_tokens=5",
                   "--logging.sample_prompt=XYZ")
    assert "logging.sample_prompt" in one_line_error(p)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resume_refuses_a_character_alphabet_that_moved_ids_even_at_the_same_size(data_root, tmp_path):
    """Re-preparing a char dataset in place from a text with one character replaced keeps the
    name and the vocabulary size, yet ids now mean other characters: the resume is refused."""
    data = tmp_path / "data" / "chars"
    char_dataset(data, "abcde fghij\n" * 200)
    train_here(tmp_path / "data", tmp_path / "run", "--data.dataset=chars", "--train.max_steps=2")
    for f in data.iterdir():
        f.unlink()
    char_dataset(data, "abcde fghiz\n" * 200)  # j -> z: still 12 symbols, z sorts last
    before = snapshot(tmp_path / "run" / "checkpoints")
    p = train_cli(tmp_path / "data", tmp_path / "run", "--data.dataset=chars", "--train.max_steps=4")
    line = one_line_error(p)
    assert "the character alphabet changed (id 11 now stands for other characters)" in line, line
    assert snapshot(tmp_path / "run" / "checkpoints") == before


def test_a_run_whose_every_checkpoint_is_damaged_stops_instead_of_starting_over(run_copy, data_root):
    for step in ("step_2", "step_4"):
        flip_byte(next((run_copy / "checkpoints" / step).glob("*.distcp")))
    before, metrics = snapshot(run_copy / "checkpoints"), (run_copy / "metrics.jsonl").read_bytes()
    p = train_cli(data_root, run_copy, "--train.max_steps=6")
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: checkpoint: none of the checkpoints in"), p.stderr
    assert "Traceback" not in p.stderr and "skipping" in p.stdout
    assert snapshot(run_copy / "checkpoints") == before and (run_copy / "metrics.jsonl").read_bytes() == metrics


def test_a_run_whose_every_checkpoint_is_truncated_stops_before_verifying(run_copy, data_root):
    for step in ("step_2", "step_4"):
        shard = next((run_copy / "checkpoints" / step).glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:100])
    p = train_cli(data_root, run_copy, "--train.max_steps=6")
    assert p.returncode == 1 and "none of the checkpoints in" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert "step_0" not in p.stdout and not (run_copy / "checkpoints" / "step_6").exists()


# --- loss-spike guard --------------------------------------------------------------------------

def test_spike_guard_skips_a_norm_far_above_its_recent_history():
    guard = SpikeGuard(zscore=6, window=50)
    norms = [1.0 + 0.01 * (i % 5) for i in range(30)]
    assert not any(guard.is_spike(x) for x in norms)
    assert guard.is_spike(5.0) and guard.skipped == 1
    assert guard.norms[-1] != 5.0  # a skipped norm does not become history
    assert not guard.is_spike(1.02)


def test_spike_guard_is_off_by_default():
    guard = SpikeGuard(zscore=0, window=50)
    assert not any(guard.is_spike(x) for x in [1.0] * 20 + [1e6])


def test_spike_guard_history_survives_a_resume(data_root, tmp_path, capsys):
    # strict (skips often); a schedule that does not depend on max_steps
    guard = ["--train.spike_zscore=0.5", "--train.spike_window=4", "--optim.decay_steps=14"]
    train_here(data_root, tmp_path / "whole", "--train.max_steps=16", *guard)
    assert "is a spike" in capsys.readouterr().out
    train_here(data_root, tmp_path / "cut", "--train.max_steps=8", *guard)
    train_here(data_root, tmp_path / "cut", "--train.max_steps=16", *guard)
    assert losses_by_step(tmp_path / "cut") == losses_by_step(tmp_path / "whole")
    skips = lambda d: [r["spike_skips"] for r in read_metrics(d) if "loss" in r][-1]
    assert skips(tmp_path / "cut") == skips(tmp_path / "whole") > 0

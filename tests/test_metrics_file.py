"""metrics.jsonl under damage: a line cut by a full disk or a crash is never glued to the next
record, and every reader skips a damaged line, naming it, instead of failing."""

import errno
import json

import pytest

from conftest import TINY, run_module
from scaling.config import load_config
from scaling.metrics import Metrics, read_metrics
from scaling.train import train


def record(step, **extra):
    return {"step": step, "loss": 4.0 - 0.1 * step, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_sec": 1000.0,
            "mfu": None, "elapsed_s": 0.1 * step, "tokens": 512 * step, **extra}


def write_lines(path, *lines: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(lines))
    return path


def line(r) -> bytes:
    return (json.dumps(r) + "\n").encode()


def test_a_record_that_does_not_fit_on_a_full_disk_leaves_no_partial_line(tmpfs, capsys):
    small_disk = tmpfs("size=64k")
    m = Metrics(small_disk)
    with pytest.raises(OSError) as e:
        for step in range(10_000):  # ~300 bytes a record: the disk is full after ~200
            m.log(record(step, note="x" * 100))
    m.close()
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(small_disk / "metrics.jsonl")
    data = (small_disk / "metrics.jsonl").read_bytes()
    assert data.endswith(b"\n")
    assert [r["step"] for r in read_metrics(small_disk / "metrics.jsonl")] == list(range(data.count(b"\n")))


class FailsPartWay:
    """A file whose second write fails after the first took only half the line (a disk filling up)."""

    def __init__(self, f):
        self.f, self.writes = f, 0

    def write(self, b):
        self.writes += 1
        if self.writes == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(b[:len(b) // 2])

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_a_write_that_fails_part_way_is_undone(tmp_path, capsys):
    m = Metrics(tmp_path)
    m.log(record(1))
    m.file = FailsPartWay(m.file)
    with pytest.raises(OSError, match="No space left"):
        m.log(record(2))
    m.file = m.file.f
    m.log(record(3))
    m.close()
    assert (tmp_path / "metrics.jsonl").read_bytes() == line(record(1)) + line(record(3))


def test_a_resumed_run_ends_a_cut_last_line_before_appending_and_keeps_its_bytes(data_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = [f"--data.root={data_root}", f"--logging.run_dir={run_dir}", "--logging.sample_tokens=0"]
    train(load_config(TINY, args))
    f = run_dir / "metrics.jsonl"
    whole = f.read_bytes()
    cut = whole[:-20]  # the last record lost its end, newline included (the disk filled up)
    f.write_bytes(cut)
    capsys.readouterr()
    train(load_config(TINY, [*args, "--train.max_steps=10"]))
    err = capsys.readouterr().err
    assert err.count(f"warning: {f}: its last line was cut short") == 1
    data = f.read_bytes()
    assert data.startswith(cut + b"\n")  # the damaged line's bytes kept, ended, then the resumed run's records
    reports, damaged = [], whole.count(b"\n")  # the cut record was the last of the first run
    steps = [r["step"] for r in read_metrics(f, report=reports.append) if "loss" in r]
    assert reports == [f"{f}: skipped 1 damaged line(s): {damaged}"] and steps[-1] == 10


def test_reading_skips_cut_and_garbled_lines_and_names_them_in_one_report(tmp_path):
    f = write_lines(tmp_path / "metrics.jsonl", line(record(1)),
                    b'{"step": 2, "loss": 3.9, "l' + line(record(2)),  # a cut line a resume appended to
                    b"\xff\xfe garbage \x00\n", line(record(3)), b'{"step": 4, "lo')
    reports = []
    assert [r["step"] for r in read_metrics(f, report=reports.append)] == [1, 3]
    assert reports == [f"{f}: skipped 3 damaged line(s): 2, 3, 5"]


def test_plot_of_a_damaged_metrics_file_warns_once_and_plots_the_good_lines(tmp_path):
    run = tmp_path / "run"
    write_lines(run / "metrics.jsonl", line(record(1)), line(record(2)), b'{"step": 5, "loss": 3.9, "l' + line(record(3)),
                line({"step": 4, "val_loss": 3.5, "tokens": 2048, "elapsed_s": 1.0}), b"\x00\x00\x00")
    p = run_module("scaling.plot", run, "-o", tmp_path / "c.png", "--table")
    assert p.returncode == 0, p.stderr
    assert p.stderr == f"warning: {run / 'metrics.jsonl'}: skipped 2 damaged line(s): 3, 5\n"
    assert "(6 curves from 1 run(s))" in p.stdout and (tmp_path / "c.png").is_file()


def test_plot_of_a_metrics_file_without_one_good_line_is_one_error_line(tmp_path):
    run = tmp_path / "run"
    write_lines(run / "metrics.jsonl", b'{"step": 5, "loss": 3.9, "l{"step": 5, "lo')
    p = run_module("scaling.plot", run, "-o", tmp_path / "c.png")
    assert p.returncode == 2 and not (tmp_path / "c.png").exists()
    assert p.stderr == (f"error: {run / 'metrics.jsonl'}: skipped 1 damaged line(s): 1; "
                        "no training or validation record to plot\n")

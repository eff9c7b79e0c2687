"""The GPU image: Python 3.10 and torch 2.11, the oldest we support.

Python 3.10 is checked statically here, in the default tier (vermin reads every construct's
minimum version: a keyword like catch_warnings(action=), `except*`, a module, an f-string that
only 3.12 parses). torch 2.11 needs a venv of its own: `make test-compat` runs this file and the
tests that touch what changed between torch releases there.
"""

import os
import signal
import subprocess
import sys
import time

from conftest import ROOT

OLDEST = (3, 10)
VERMIN = "import sys; from vermin.main import main; sys.exit(main())"  # vermin has no __main__


def too_new(*paths) -> list[str]:
    """'file:line: what' for each construct in paths that Python 3.10 lacks."""
    target = ".".join(map(str, OLDEST))
    # --eval-annotations: without `from __future__ import annotations` 3.10 evaluates them.
    # --pessimistic: a file this Python cannot parse (3.12's f-strings on 3.11) counts as too new.
    p = subprocess.run([sys.executable, "-c", VERMIN, f"--target={target}-", "--violations", "--no-tips",
                        "--eval-annotations", "--pessimistic", "--no-make-paths-absolute", "--format", "parsable",
                        *map(str, paths)], cwd=ROOT, capture_output=True, text=True)
    lines = p.stdout.splitlines()
    assert lines and lines[-1].startswith(":::"), f"vermin did not run (pip install -e '.[dev]'):\n{p.stderr}"
    found = []
    for line in lines:  # path:line:column:py2:py3:what
        path, lineno, _, _, py3, what = line.split(":", 5)
        if not lineno or not py3 or py3.startswith("~"):  # a summary line, or nothing needed
            continue
        if py3 == "!3":  # this Python cannot parse it
            found.append(f"{path}:{lineno}: {what}")
        elif tuple(map(int, py3.split("."))) > OLDEST:
            found.append(f"{path}:{lineno}: {what} (Python {py3})")
    return found


def test_the_package_runs_on_python_3_10():
    found = too_new("scaling", *(p.relative_to(ROOT) for p in ROOT.glob("launch/*.py")))
    assert not found, "needs a Python newer than 3.10 (the GPU image's):\n" + "\n".join(found)


# Each in a file of its own: what a Python cannot parse (except* on 3.10) hides the rest of its file.
NEWER = {
    "catch.py": 'import warnings\nwith warnings.catch_warnings(action="ignore"):\n    pass\n',  # 3.11
    "group.py": "try:\n    pass\nexcept* ValueError:\n    pass\n",  # 3.11
    "fstring.py": 'd = {"a": 1}\nprint(f"{d["a"]}")\n',  # an f-string reusing its quotes: 3.12
}


def test_the_3_10_check_names_the_file_and_line_of_each_newer_construct(tmp_path):
    for name, text in NEWER.items():
        (tmp_path / name).write_text(text)
    where = sorted(line.split(": ")[0] for line in too_new(tmp_path))
    assert where == [f"{tmp_path}/catch.py:2", f"{tmp_path}/fstring.py:2", f"{tmp_path}/group.py:3"], where


# Ignores SIGTERM, as a worker still writing its stop-save would, and leaves a mark if it lives 20 s.
DEAF_WORKER = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1] + ".ready", "w").write(str(os.getpid()))
time.sleep(20)
open(sys.argv[1] + ".outlived", "w").close()
"""


def test_the_launcher_gives_its_workers_the_shutdown_timeout_on_every_torch(tmp_path):
    """TORCH_ELASTIC_SHUTDOWN_TIMEOUT (launch/slurm_gpt2.sh sets it to the stop-save's lead time):
    torch 2.12+ reads it, and scaling.launch gives torch 2.11 the same. Shown with a short one:
    after 1 s the worker that ignores SIGTERM is killed (torch's own 30 s would let it live 20 s)."""
    (tmp_path / "worker.py").write_text(DEAF_WORKER)
    ready, outlived = tmp_path / "worker.ready", tmp_path / "worker.outlived"
    env = dict(os.environ, TORCH_ELASTIC_SHUTDOWN_TIMEOUT="1", OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "scaling.launch", "--standalone", "--nproc_per_node=1",
                          str(tmp_path / "worker.py"), str(tmp_path / "worker")], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not ready.exists() and p.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert ready.exists(), p.communicate(timeout=60)[0]
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=120)
    finally:
        p.kill()
    worker = int(ready.read_text())
    left = running(worker)
    if left:
        os.kill(worker, signal.SIGKILL)  # leave nothing behind
    assert p.returncode == 1 and "SIGTERM ended the workers" in out, out
    assert not left and not outlived.exists(), out


def running(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_a_shutdown_timeout_that_is_not_whole_seconds_is_one_line_and_exit_2():
    env = dict(os.environ, TORCH_ELASTIC_SHUTDOWN_TIMEOUT="4m")
    p = subprocess.run([sys.executable, "-m", "scaling.launch", "--standalone", "--nproc_per_node=1",
                        "-m", "scaling.train"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr == "error: TORCH_ELASTIC_SHUTDOWN_TIMEOUT='4m': expected whole seconds, e.g. 240\n"

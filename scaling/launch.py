"""torchrun, with an exit code a caller can act on: python -m scaling.launch [torchrun options] -m MODULE ARGS

torchrun ends every failure, a clean preemption stop included, with exit 1 and a traceback
(ChildFailedError for a failed worker, SignalException when torchrun itself got SIGTERM), so a
scheduler or a retry loop cannot tell "saved, run me again" from a crash. This runs torchrun's
own launcher (same options, same workers) and ends with one line and one code:

  0   every worker finished;
  75  every worker of this node saved its step and stopped (a preemption: run the same command);
  2   the workers refused their input (each said why, in one line);
  1   anything else: a crash, a worker killed by a signal, a stop that did not save everywhere.

A worker marks a clean stop in the folder SCALING_EXIT_DIR names (distributed.mark_preempted)
before it exits, so the mark counts even when torchrun's shutdown signal ends it a moment later.
The launchers in launch/ run torchrun through this module.
"""

import os
import signal
import sys
import tempfile
import uuid
from pathlib import Path

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import elastic_launch
from torch.distributed.run import config_from_args, parse_args

from scaling.distributed import EXIT_DIR, EXIT_PREEMPTED


def launch(argv: list[str]) -> tuple[int, str]:
    """Run torchrun with argv; (exit code, the line that explains it, or "")."""
    args = parse_args(argv)
    if args.standalone:  # what torchrun's own entry point does for --standalone
        args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    if args.master_port is None:
        args.master_port = 29500
    config, cmd, cmd_args = config_from_args(args)
    marks = Path(os.environ[EXIT_DIR])
    try:
        elastic_launch(config, cmd)(*cmd_args)
        return 0, ""
    except ChildFailedError as e:
        failures, stopped_by = e.failures, None
    except SignalException as e:
        failures, stopped_by = {}, signal.Signals(e.sigval).name
    return outcome(failures, len(list(marks.glob("rank*"))), config.nproc_per_node, stopped_by)


def outcome(failures: dict, saved: int, nproc: int, stopped_by: str | None) -> tuple[int, str]:
    """(exit code, line) of a torchrun that did not end well. failures: torchrun's record of the
    workers that failed, by rank; saved: how many of this node's nproc workers marked a clean stop;
    stopped_by: the signal torchrun itself got, if that is what ended it."""
    if saved == nproc:
        return EXIT_PREEMPTED, (f"launch: all {saved} workers saved their step and stopped: exit "
                                f"{EXIT_PREEMPTED} (run the same command to resume)")
    if stopped_by:
        return 1, (f"error: launch: {stopped_by} ended the workers; {saved} of {nproc} saved "
                   "their step first (the newest complete checkpoint is intact)")
    # After the first failure torchrun ends the other workers with SIGTERM: those are not causes.
    causes = {r: f for r, f in failures.items() if f.exitcode != -signal.SIGTERM} or failures
    if {f.exitcode for f in causes.values()} == {2}:  # bad input: the workers (or rank 0) said why
        return 2, ""
    # Name one failure: a worker killed by a signal first (it could not say why itself), else the first.
    rank, worst = min(causes.items(), key=lambda kv: (kv[1].exitcode >= 0, kv[1].timestamp))
    how = f"was killed by {worst.signal_name()}" if worst.exitcode < 0 else f"exited with code {worst.exitcode}"
    return 1, f"error: launch: worker rank {rank} (pid {worst.pid}) {how}; the lines above say why"


def main(argv=None):
    with tempfile.TemporaryDirectory(prefix="scaling-launch-") as marks:
        os.environ[EXIT_DIR] = marks  # the workers inherit it
        code, line = launch(sys.argv[1:] if argv is None else argv)
    if line:
        print(line, file=sys.stderr if code not in (0, EXIT_PREEMPTED) else sys.stdout, flush=True)
    sys.exit(code)


if __name__ == "__main__":
    main()

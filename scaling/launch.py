"""torchrun, with an exit code a caller can act on: python -m scaling.launch [torchrun options] -m MODULE ARGS

torchrun ends every failure, a clean preemption stop included, with exit 1 and a traceback
(ChildFailedError for a failed worker, SignalException when torchrun itself got SIGTERM), so a
scheduler or a retry loop cannot tell "saved, run me again" from a crash. This runs torchrun's
own launcher (same options, same workers) and ends with one line and one code:

  0   every worker finished (no line; under Slurm "launch: all N workers finished", so that a
      job's report can tell a node that finished from one that was lost);
  75  every worker of this node saved its step and stopped (a preemption: run the same command);
  130 the same after Ctrl-C (no line: the workers' rank 0 said it);
  2   the workers refused their input (each said why, in one line);
  1   anything else: a crash, a worker killed by a signal, a stop that did not save everywhere,
      a rendezvous that failed.

A worker marks a clean stop in the folder SCALING_EXIT_DIR names (distributed.mark_preempted)
before it exits, so the mark counts even when torchrun's shutdown signal ends it a moment later.
The launchers in launch/ run torchrun through this module.

Elastic runs (torchrun --nnodes=MIN:MAX --max-restarts=R, launch/slurm_gpt2.sh with SCALING_MIN_NODES):
when a node dies, the other nodes' workers fail in a collective and their agents restart them on the
nodes left, from the newest checkpoint. A restart cannot mend bad input (exit 2) or a loss that went
non-finite (exit 3): those end the launcher at once. Under Slurm the head node (SLURM_NODEID 0) hosts
the rendezvous store, whichever agent starts first.

After a Slurm job step, launch/slurm_gpt2.sh runs `python -m scaling.launch --report LOG@OFFSET ...`
(node k's log k-th, read from the byte offset where this step began): every rank's `error:` line
once, saying how many ranks on which nodes printed it, and an exit code for the whole step
(2 bad input, 1 a failure, 0 when the logs explain nothing).
"""

import dataclasses
import logging
import os
import re
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

from torch.distributed.elastic.agent.server.api import SimpleElasticAgent
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing.api import PContext, SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous.api import RendezvousError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from torch.distributed.run import config_from_args, parse_args

from scaling.distributed import EXIT_DIR, EXIT_INTERRUPTED, EXIT_PREEMPTED
from scaling.errors import die

BAD_INPUT = "launch: bad input: exit 2 (the workers said why)"
SIGNAL_ENDED = re.compile(r"error: launch: SIG\w+ ended the workers")
STOPPED = re.compile(r"launch: all \d+ workers saved their step and stopped")
FINISHED = "launch: all {} workers finished"
# After a node dies, the nodes left meet again: the dead one's heartbeat expires after 3 beats 2 s
# apart (torchrun: 3 x 5 s), then they wait 10 s more for stragglers (torchrun: 30 s) before
# going on without it. Nodes that cannot make up the minimum give up after 10 minutes.
ELASTIC_RENDEZVOUS = {"join_timeout": "600", "last_call_timeout": "10", "keep_alive_interval": "2",
                      "keep_alive_max_attempt": "3"}
NOT_MENDED_BY_A_RESTART = {2: "bad input", 3: "a non-finite loss"}  # the workers' exit codes
STARTED = []  # when this agent started its workers (after each rendezvous)


def launch(argv: list[str]) -> tuple[int, str]:
    """Run torchrun with argv; (exit code, the line that explains it, or "")."""
    args = parse_args(argv)
    if args.standalone:  # what torchrun's own entry point does for --standalone
        args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    if args.master_port is None:
        args.master_port = 29500
    args.rdzv_conf = rendezvous_conf(args.nnodes, args.rdzv_conf, os.environ.get("SLURM_NODEID"))
    config, cmd, cmd_args = config_from_args(args)
    marks = Path(os.environ[EXIT_DIR])
    try:
        elastic_launch(config, cmd)(*cmd_args)
        return 0, FINISHED.format(config.nproc_per_node) if "SLURM_JOB_ID" in os.environ else ""
    except ChildFailedError as e:
        failures, stopped_by = e.failures, None
    except SignalException as e:
        failures, stopped_by = {}, signal.Signals(e.sigval).name
    except RendezvousError as e:  # a node that cannot reach the head, or one that never came
        why = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
        if STARTED:  # it worked before: the nodes have lost it since
            return 1, (f"error: launch: the rendezvous at {args.rdzv_endpoint} was lost after the workers started "
                       f"({why}): its host, the head node, is gone, or fewer than the minimum of nodes are left")
        return 1, f"error: launch: the rendezvous at {args.rdzv_endpoint} failed ({why}): can every node reach it?"
    codes = [int(m.read_text() or EXIT_PREEMPTED) for m in marks.glob("rank*")]
    code, line = outcome(failures, len(codes), config.nproc_per_node, stopped_by)
    if code == EXIT_PREEMPTED and EXIT_INTERRUPTED in codes:  # Ctrl-C: rank 0's line said it all
        return EXIT_INTERRUPTED, ""
    return code, line


def give_workers_the_shutdown_timeout():
    """Workers get TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds from torchrun's SIGTERM to its SIGKILL
    (launch/slurm_gpt2.sh sets it to the stop-save's lead time). torch 2.12+ reads it itself; 2.11,
    the GPU image's, closes its workers with PContext.close's fixed default, 30 s, which would kill a
    long stop-save. This process is torchrun's agent alone: make that default the variable's."""
    seconds = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
    if seconds is None:
        return
    if not seconds.isdigit():  # torch 2.12+ would end in a traceback
        die(f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT={seconds!r}: expected whole seconds, e.g. 240")
    if "shutdown_timeout" in {f.name for f in dataclasses.fields(LaunchConfig)}:
        return  # torch 2.12+
    close = PContext.close

    # Also when torchrun stops the others after one worker failed (2.12+ gives those 30 s).
    def close_after_the_timeout(self, death_sig=None, timeout=int(seconds)):
        close(self, death_sig, timeout)

    PContext.close = close_after_the_timeout


def rendezvous_conf(nnodes: str, given: str, slurm_node: str | None) -> str:
    """torchrun's --rdzv_conf for --nnodes: the given keys, plus ELASTIC_RENDEZVOUS's for an elastic
    MIN:MAX, plus which agent hosts the rendezvous under Slurm: node 0, the head, whose address the
    endpoint is. Left to itself each agent guesses from its host name, and on one machine (the
    loopback cluster) any of them may win."""
    conf = dict(kv.split("=", 1) for kv in given.split(",") if "=" in kv)
    if slurm_node is not None:
        conf.setdefault("is_host", str(int(slurm_node == "0")))
    if len(set(nnodes.split(":"))) > 1:
        conf = {**ELASTIC_RENDEZVOUS, **conf}
    return ",".join(f"{k}={v}" for k, v in conf.items())


def restart_only_what_a_restart_mends(marks: Path):
    """torchrun's agent restarts its workers after any failure, up to --max-restarts times. Make
    it stop at once when a worker exited with a code that says the same input fails the same way
    again, and forget the clean-stop marks of the attempt before a restart (the next attempt's
    ranks make their own). Note when the workers started: a rendezvous lost after that is not
    one that never formed. This process is torchrun's agent alone."""
    monitor, restart = LocalElasticAgent._monitor_workers, SimpleElasticAgent._restart_workers
    initialize = SimpleElasticAgent._initialize_workers

    def monitor_workers(self, worker_group):
        result = monitor(self, worker_group)
        if result.is_failed() and {f.exitcode for f in result.failures.values()} & NOT_MENDED_BY_A_RESTART.keys():
            self._remaining_restarts = 0
        return result

    def restart_workers(self, worker_group):
        for mark in marks.glob("rank*"):
            mark.unlink()
        restart(self, worker_group)

    def initialize_workers(self, worker_group):
        initialize(self, worker_group)
        STARTED.append(time.time())

    LocalElasticAgent._monitor_workers = monitor_workers
    SimpleElasticAgent._initialize_workers = initialize_workers
    SimpleElasticAgent._restart_workers = restart_workers


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
        return 2, BAD_INPUT
    # Name one failure: a worker killed by a signal first (it could not say why itself), else the first.
    rank, worst = min(causes.items(), key=lambda kv: (kv[1].exitcode >= 0, kv[1].timestamp))
    how = f"was killed by {worst.signal_name()}" if worst.exitcode < 0 else f"exited with code {worst.exitcode}"
    return 1, f"error: launch: worker rank {rank} (pid {worst.pid}) {how}; the lines above say why"


def spans(nodes) -> str:
    """[0, 1, 2, 3, 7] -> "0-3, 7": a line from every node of a 64-node job stays short."""
    runs = []
    for n in sorted(nodes):
        if runs and runs[-1][-1] == n - 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)


def read_from(path: str, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:  # the node never wrote it (its step did not start)
        return ""


def report(logs: list[tuple[str, int]]) -> tuple[list[str], int]:
    """What a job step's node logs say went wrong, and the step's exit code. logs[k]: node k's
    log and the offset where this step's part of it begins (a requeued job appends).

    Each `error: ...` line (one per failure, the project's rule) once, with how many ranks on
    which nodes printed it; not the C++ frames or tracebacks around them. The code: 2 when a node's
    workers refused their input, else 1 when a launcher reported a failure, else 0 (the logs
    explain nothing); but EXIT_PREEMPTED, with no lines, when a node's workers all saved their
    step and stopped and every other node said the same or was ended by a signal: a worker stops
    only once the checkpoint is committed on every rank (Checkpointer.wait), and srun
    --kill-on-bad-exit ends the nodes still on their way out, so srun's own status is 143 or 137."""
    said, codes, stopped = {}, set(), False  # line -> how often on each node; the launchers' exit codes
    for node, (path, offset) in enumerate(logs):
        for line in read_from(path, offset).splitlines():
            if STOPPED.match(line):
                stopped = True
            elif line == BAD_INPUT:
                codes.add(2)
            elif line.startswith("error: "):
                said.setdefault(line, Counter())[node] += 1
                if line.startswith("error: launch: "):
                    codes.add(1)
    # After the first failure Slurm ends the other nodes' launchers with SIGTERM (srun
    # --kill-on-bad-exit): what they say is not a cause, unless nothing else is said.
    causes = {line: nodes for line, nodes in said.items() if not SIGNAL_ENDED.match(line)}
    if stopped and not causes and 2 not in codes:
        return [], EXIT_PREEMPTED
    causes = causes or said
    lines = []
    for line, nodes in sorted(causes.items(), key=lambda kv: kv[0].startswith("error: launch: ")):  # ranks first
        where = f"node{'s' if len(nodes) > 1 else ''} {spans(nodes)}"
        if line.startswith("error: launch: "):  # one launcher per node
            lines.append(f"{line}  [{where}]")
        else:
            ranks = sum(nodes.values())
            lines.append(f"{line}  [{ranks} rank{'s' if ranks > 1 else ''} on {where}]")
    return lines, 2 if 2 in codes else 1 if 1 in codes else 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--report"]:  # launch/slurm_gpt2.sh, after a job step
        lines, code = report([(path, int(offset)) for path, _, offset in (a.rpartition("@") for a in argv[1:])])
        for line in lines:
            print(line)
        sys.exit(code)
    # torchrun's own log lines ("failed (exitcode: 2) ...", "Received 2 death signal, shutting down
    # workers", "Sending process ... closing signal") say what our one closing line says better.
    # This process is torchrun's agent alone: every log record in it is torchrun's.
    logging.disable(logging.ERROR)
    give_workers_the_shutdown_timeout()
    with tempfile.TemporaryDirectory(prefix="scaling-launch-") as marks:
        os.environ[EXIT_DIR] = marks  # the workers inherit it
        restart_only_what_a_restart_mends(Path(marks))
        code, line = launch(argv)
    if line == BAD_INPUT and "SLURM_JOB_ID" not in os.environ:
        line = ""  # rank 0's error line is the one to read; a Slurm job's report needs the mark
    if line:
        print(line, file=sys.stderr if code not in (0, EXIT_PREEMPTED) else sys.stdout, flush=True)
    sys.exit(code)


if __name__ == "__main__":
    main()

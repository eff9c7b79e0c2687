"""A real two-node Slurm cluster on this machine, for the launcher tests.

Two slurmd daemons (nodes n1, n2) and one slurmctld on loopback, munge for authentication,
no systemd, no cgroups, no accounting (see ../shared/DESIGN.md). Started from nothing in a
temporary folder; everything is killed afterwards.
"""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

CONF = """ClusterName=scalingtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/munge
# Slurm holds a requeued job back until its old credential expires (120 s by default).
AuthInfo=cred_expire=10
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool-%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
EnforcePartLimits=ALL
KillWait=30
NodeName=n[1-2] NodeHostname={host} NodeAddr=127.0.0.1 Port=[{node_port}-{node_port_2}] CPUs=1 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
"""


def install() -> str | None:
    """Install slurm-wlm and munge when missing; the reason it cannot be done, or None."""
    if shutil.which("slurmctld") and shutil.which("munged"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed and cannot be (needs root and apt-get)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    p = subprocess.run(["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"], env=env,
                       capture_output=True, text=True)
    if p.returncode:
        p = subprocess.run("apt-get update -q && apt-get install -y -q slurm-wlm munge", shell=True, env=env,
                           capture_output=True, text=True)
    if p.returncode or not shutil.which("slurmctld"):
        return f"apt-get install slurm-wlm munge failed: {p.stderr.strip().splitlines()[-1:]}"
    return None


class Cluster:
    def __init__(self, d: Path):
        self.d = d
        self.procs = []
        self.env = dict(os.environ, SLURM_CONF=str(d / "slurm.conf"))

    def start(self):
        host = socket.gethostname()
        # 10000-13999: below the launcher's rendezvous ports (20000 + job id % 12000), which a
        # daemon's port here would otherwise take (job 1 met slurmd on 20001 once).
        base = 10000 + os.getpid() % 1000 * 4
        (self.d / "state").mkdir(parents=True, exist_ok=True)
        (self.d / "slurm.conf").write_text(CONF.format(host=host, d=self.d, ctld_port=base,
                                                       node_port=base + 1, node_port_2=base + 2))
        self._munge()
        self._daemon(["slurmctld", "-D", "-c", "-i"])
        for node in ("n1", "n2"):
            self._daemon(["slurmd", "-D", "-N", node])
        deadline = time.time() + 60
        while time.time() < deadline:
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout
            if out.count("idle") == 2:
                return
            time.sleep(0.5)
        raise RuntimeError(f"Slurm nodes did not come up: {out}\n{self.logs()}")

    def _munge(self):
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # already running
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "munged", "--force"], check=True)
        for _ in range(50):
            if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("munged did not start")

    def _daemon(self, cmd):
        log = open(self.d / f"{cmd[0]}-{len(self.procs)}.out", "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def run(self, cmd, check=True, **kw):
        p = subprocess.run(cmd, env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True, **kw)
        if check and p.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {p.stdout}{p.stderr}")
        return p

    def job(self, job_id) -> dict:
        out = self.run(["scontrol", "show", "job", str(job_id)], check=False).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait(self, job_id, states, timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            j = self.job(job_id)
            if j.get("JobState") in states:
                return j
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} did not reach {states}: {self.job(job_id)}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(self.d.glob("*.log")))

    def stop(self):
        self.run(["scancel", "--user=root"], check=False)
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()

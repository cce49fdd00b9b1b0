"""A private one-machine SLURM cluster for tests: munged, slurmctld and slurmd on private ports.

Import the fixture into a test module: ``from slurm_cluster import slurm_cluster``. Nothing is
written to the system's SLURM or munge folders: the cluster's config, munge key and socket, state
and logs live in a temp dir, and the SLURM client commands find the config through ``SLURM_CONF``,
which the fixture sets for the test session (subprocesses inherit it). CI installs the Debian
packages ``slurm-wlm`` and ``munge``; a missing piece fails the test loudly instead of skipping it.
Finished jobs are kept in a job-completion log, so ``sacct -c`` lists them.

The cluster has no accounting daemon (slurmdbd needs a MySQL server), so plain ``sacct`` fails;
submitit polls it to learn that a job ended without writing its result (e.g. cancelled). The
fixture puts a ``sacct`` first on PATH that answers such queries from the job-completion log,
naming array tasks ``<array job>_<task>`` as slurmdbd's sacct does; ``sacct -c`` runs the real one.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd")


@dataclass
class SlurmCluster:
    root: Path  # temp dir with slurm.conf, logs and state
    conf: Path  # slurm.conf (also in os.environ["SLURM_CONF"] while the fixture lives)
    node: str  # the one node's name (this machine's host name)
    cpus: int

    def jobs(self) -> dict[str, str]:
        """Job id (array tasks: <array job>_<task>) -> final state (COMPLETED, FAILED, CANCELLED, ...)
        of every finished job, from the job-completion log (`sacct -c` lists array tasks by their
        own job ids; the fixture's sacct names them as submitit and slurmdbd do)."""
        out = subprocess.run(
            ["sacct", "-n", "-P", "-o", "JobID,State"], capture_output=True, text=True, check=True
        ).stdout
        return dict(line.split("|")[:2] for line in out.splitlines() if "|" in line)

    def queue(self) -> list[str]:
        """Ids of the jobs pending or running now."""
        out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
        return out.split()


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _slurm_conf(root: Path, node: str, cpus: int, ctld_port: int, slurmd_port: int) -> str:
    return f"""\
ClusterName=digitnet-test
SlurmctldHost={node}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root / "munge" / "munge.socket"}
StateSaveLocation={root / "state"}
SlurmdSpoolDir={root / "spool"}
SlurmctldPidFile={root / "slurmctld.pid"}
SlurmdPidFile={root / "slurmd.pid"}
SlurmctldLogFile={root / "log" / "slurmctld.log"}
SlurmdLogFile={root / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root / "log" / "jobcomp.txt"}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
KillWait=5
NodeName={node} CPUs={cpus} RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


SACCT = """\
#!{python}
# sacct -o FIELDS --parsable2 [-j ID]... from the job-completion log (see tests/slurm_cluster.py)
import os, re, sys
args = sys.argv[1:]
if "-c" in args:
    os.execv("{sacct}", ["sacct", *args])
fields = args[args.index("-o") + 1].split(",")
wanted = {{args[i + 1] for i, a in enumerate(args) if a == "-j"}}
if "-n" not in args:
    print("|".join(fields))
for line in open("{log}") if os.path.exists("{log}") else []:
    job = dict(re.findall(r"(\\w+)=(\\S*)", line))
    if "ArrayJobId" in job:
        job["JobID"] = job["ArrayJobId"] + "_" + job["ArrayTaskId"]
    else:
        job["JobID"] = job["JobId"]
    job["State"] = job["JobState"]
    if not wanted or wanted & {{job["JobId"], job.get("ArrayJobId")}}:
        print("|".join(job.get(f, "") for f in fields))
"""


def _sacct_shim(root: Path) -> Path:
    """A folder holding the job-completion-log sacct, to put first on PATH."""
    bin_dir = root / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "sacct"
    shim.write_text(SACCT.format(python=sys.executable, sacct=shutil.which("sacct"), log=root / "log" / "jobcomp.txt"))
    shim.chmod(0o755)
    return bin_dir


def _wait_for_node(deadline_s: float, root: Path) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip() in ("idle", "mixed", "allocated"):
            return
        time.sleep(0.5)
    log = (root / "log" / "slurmctld.log").read_text(errors="replace")[-2000:]
    pytest.fail(f"the test SLURM node did not come up within {deadline_s:.0f} s; slurmctld log:\n{log}")


@pytest.fixture(scope="session")
def slurm_cluster():
    missing = [d for d in DAEMONS if not os.access(d, os.X_OK)] + [
        c for c in ("sbatch", "sacct") if not shutil.which(c)
    ]
    if missing:
        pytest.fail(f"SLURM not installed ({', '.join(missing)} missing): apt-get install -y slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.fail("the test SLURM cluster runs its daemons as root (slurmd starts jobs as their users)")
    node, cpus = socket.gethostname(), os.cpu_count() or 1
    root = Path(tempfile.mkdtemp(prefix="digitnet-slurm-"))
    root.chmod(0o755)  # munged insists that every folder above its socket is searchable
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir()
    munge = root / "munge"
    munge.mkdir(mode=0o755)
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    shutil.chown(munge, "munge", "munge")
    shutil.chown(key, "munge", "munge")
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, node, cpus, *_free_ports(2)))
    (root / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")

    def run(*args: str) -> None:
        done = subprocess.run(args, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(args)} failed: {done.stderr.strip()}")

    pid_files = [munge / "munged.pid", root / "slurmctld.pid", root / "slurmd.pid"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(conf))
        patch.setenv("PATH", f"{_sacct_shim(root)}{os.pathsep}{os.environ['PATH']}")
        try:
            run(
                "runuser",
                "-u",
                "munge",
                "--",
                DAEMONS[0],
                f"--socket={munge / 'munge.socket'}",
                f"--key-file={key}",
                f"--pid-file={pid_files[0]}",
                f"--log-file={munge / 'munged.log'}",
                f"--seed-file={munge / 'seed'}",
            )
            run(DAEMONS[1], "-f", str(conf))
            run(DAEMONS[2], "-f", str(conf))
            _wait_for_node(30, root)
            yield SlurmCluster(root, conf, node, cpus)
        finally:
            subprocess.run(["scancel", "--full", "--user=root"], capture_output=True)
            for pid_file in reversed(pid_files):  # slurmd, slurmctld, then munged
                _stop(pid_file)
            shutil.rmtree(root, ignore_errors=True)


def _stop(pid_file: Path, timeout_s: float = 15) -> None:
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, 15)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            os.kill(pid, 0)
            time.sleep(0.2)
        os.kill(pid, 9)
    except ProcessLookupError:
        pass

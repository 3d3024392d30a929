"""Sweeps on a real Slurm: hydra/launcher=submitit_slurm against a one-node cluster started here.

The fixture starts munged, slurmctld and slurmd (Debian's ``munge`` and ``slurm-wlm`` packages) from a
slurm.conf generated for this machine, with every file in a folder of its own and on ports of its own, so a
Slurm already running on the machine is left alone. The test sweeps the smoke experiment over two settings
through the launcher, as a user would on a cluster, and checks that each run was a Slurm job (slurmctld's job
completion log, submitit's job logs) and that the sweep's report aggregates both runs. Skipped without the
binaries, unless KVBENCH_REQUIRE_SLURM=1 (.ci/run sets it after installing them): then their absence fails.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from harness.bench.results import find_runs

pytestmark = pytest.mark.slurm

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "sinfo", "squeue", "scancel", "sacct")
SBIN = ("/usr/sbin", "/sbin")  # where Debian puts the daemons: not on a normal user's PATH
REQUIRE = "KVBENCH_REQUIRE_SLURM"
CLUSTER = "kvbench-test"
PARTITION = "kvbench"
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 15
SWEEP_TIMEOUT_S = 180  # the sweep takes ~15 s on 2 cores; a job that dies without a result hangs submitit (no sacct)
SMOKE = ["+experiment=smoke", "workload.num_requests=4", "workload.output.value=4"]
CONCURRENCIES = (1, 2)  # the sweep axis: arrival.concurrency, one Slurm job each


def find_binary(name: str) -> str | None:
    """A Slurm or munge program, looked for in /usr/sbin and /sbin too (where the daemons are)."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (all held open while chosen): our slurmctld and slurmd must not take a
    real Slurm's 6817 and 6818."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def this_node() -> tuple[str, str]:
    """This machine's name and its slurm.conf node line (real CPUs, sockets, cores, RealMemory), from ``slurmd -C``;
    a node declared with more than it has would be drained as soon as slurmd registers."""
    done = subprocess.run([find_binary("slurmd") or "slurmd", "-C"], check=False, capture_output=True, text=True, timeout=30)
    lines = [line for line in done.stdout.splitlines() if line.startswith("NodeName=")]
    if done.returncode != 0 or not lines:
        pytest.fail(f"slurmd -C (this machine's hardware) failed, status {done.returncode}: {done.stdout}{done.stderr}")
    return lines[0].split()[0].removeprefix("NodeName="), lines[0]


def slurm_conf(root: Path, node: str, node_line: str, user: str) -> str:
    """A one-node, one-partition slurm.conf whose state, spool and job-completion files all live under ``root``.

    No cgroups (proctrack/linuxproc, task/none) and no accounting daemon (accounting_storage/none): nothing beyond
    the two Slurm daemons and munged must run, in a container too. Without accounting, ``sacct`` answers nothing:
    submitit warns on each poll and learns a job's end from its result file; slurmctld's job completion log
    (jobcomp/filetxt) is then the record of the jobs that ran."""
    ctld_port, slurmd_port = free_ports(2)
    return "\n".join([
        f"ClusterName={CLUSTER}",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        f"SlurmUser={user}",
        f"SlurmdUser={user}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root / 'munge' / 'munge.socket'}",  # our munged, not the system's
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"PlugStackConfig={root / 'plugstack.conf'}",  # empty: no SPANK plugins from /etc/slurm
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",  # as clusters do: hydra.launcher.mem_gb reaches the scheduler
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={root / 'jobcomp.txt'}",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "ReturnToService=2",
        f"{node_line} NodeAddr=127.0.0.1 State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


@dataclass
class Cluster:
    """A running one-node Slurm: its folder, slurm.conf and the environment its clients (and sbatch's jobs) need."""

    root: Path
    conf: Path
    env: dict[str, str]
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, *args: str) -> None:
        """Start a daemon in the foreground (so it is our child, stopped by its id), logging to log/NAME.log."""
        with open(self.root / "log" / f"{name}.log", "ab") as log:
            self.daemons[name] = subprocess.Popen([find_binary(name) or name, *args], env=self.env, stdin=subprocess.DEVNULL,
                                                  stdout=log, stderr=subprocess.STDOUT)

    def client(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """A Slurm client command (sinfo, sacct...) against this cluster."""
        return subprocess.run([find_binary(args[0]) or args[0], *args[1:]], check=False, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def logs(self, lines: int = 20) -> str:
        """The last lines of every daemon's log, for a failure message."""
        parts = []
        for path in sorted((self.root / "log").glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(parts)

    def wait_for(self, what: str, ready: Callable[[], bool], timeout: float = START_TIMEOUT_S) -> None:
        """Poll ``ready`` until true; fail naming ``what`` (and the daemons' logs) if a daemon dies or time runs out."""
        deadline = time.monotonic() + timeout
        while not ready():
            for name, proc in self.daemons.items():
                if proc.poll() is not None:
                    pytest.fail(f"{name} exited with status {proc.returncode} while waiting for {what}\n{self.logs()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} after {timeout} s\n{self.logs()}")
            time.sleep(0.5)

    def node_state(self) -> str:
        """The partition's node state as sinfo shows it (idle once slurmd has registered), or "" while it can't say."""
        done = self.client("sinfo", "--noheader", f"--partition={PARTITION}", "--format=%T")
        return done.stdout.strip() if done.returncode == 0 else ""

    def stop(self) -> None:
        """Cancel any job left (a failed test's), so no slurmstepd outlives slurmd; then stop the daemons, newest first."""
        if self.daemons.get("slurmctld") and self.daemons["slurmctld"].poll() is None:
            try:
                self.client("scancel", f"--partition={PARTITION}")
                deadline = time.monotonic() + STOP_TIMEOUT_S
                while time.monotonic() < deadline and self.client("squeue", "--noheader").stdout.strip():
                    time.sleep(0.5)
            except subprocess.SubprocessError:  # a hung client must not keep the daemons alive
                pass
        for proc in reversed(list(self.daemons.values())):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def missing_binaries() -> list[str]:
    """The daemons, and the clients that submitit (sbatch, srun, sacct) and this test call, that are not installed."""
    return [name for name in (*DAEMONS, *CLIENTS) if find_binary(name) is None]


def write_munge_key(path: Path) -> None:
    """A fresh key for our munged only (1 KiB of random bytes, as mungekey makes), readable by its owner alone,
    as munged insists."""
    path.write_bytes(os.urandom(1024))
    path.chmod(0o400)


def client_env(root: Path, conf: Path) -> dict[str, str]:
    """This process's environment pointed at our cluster. SLURM_* variables of an enclosing job (tests run under
    srun, say) are dropped: submitit would take them for its own job's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SLURM_CONF"] = str(conf)
    env["PATH"] = os.pathsep.join([env.get("PATH", ""), *SBIN])
    return env


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[Cluster]:
    """munged, slurmctld and slurmd on this machine, the node idle; every daemon stopped afterwards, pass or fail."""
    missing = missing_binaries()
    if missing:
        reason = (f"Slurm binaries not found: {', '.join(missing)} "
                  "(install Debian's slurm-wlm and munge: apt-get install slurm-wlm munge; .ci/run does)")
        if os.environ.get(REQUIRE) == "1":
            pytest.fail(f"{REQUIRE}=1 but {reason}")
        pytest.skip(reason)
    # munged requires every folder above its socket to be searchable by all, which pytest's tmp_path (under a 0700
    # folder) is not, and a socket's path must be short: a folder of our own in /tmp.
    root = Path(tempfile.mkdtemp(prefix="kvbench-slurm-", dir="/tmp"))
    root.chmod(0o755)
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir(mode=0o755)
    conf = root / "slurm.conf"
    cluster = Cluster(root=root, conf=conf, env=client_env(root, conf))
    try:
        write_munge_key(root / "munge" / "munge.key")
        (root / "plugstack.conf").write_text("")
        node, node_line = this_node()
        conf.write_text(slurm_conf(root, node, node_line, pwd.getpwuid(os.getuid()).pw_name))
        munge = root / "munge"
        cluster.start("munged", "--foreground", f"--socket={munge / 'munge.socket'}", f"--key-file={munge / 'munge.key'}",
                      f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'munged.seed'}",
                      f"--log-file={root / 'log' / 'munged-file.log'}")
        cluster.wait_for("munge socket", (munge / "munge.socket").exists)
        cluster.start("slurmctld", "-D", "-f", str(conf))
        cluster.start("slurmd", "-D", "-f", str(conf), "-N", node)
        cluster.wait_for(f"idle node in partition {PARTITION} (sinfo)", lambda: cluster.node_state() == "idle")
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def completed_jobs(cluster: Cluster) -> dict[str, dict[str, str]]:
    """The cluster's finished jobs by id, an array task as ARRAY_TASK (as submitit names it), from the job completion
    log: slurmctld's own record of what ran. (``sacct --completion`` reads the same file but shows an array task by
    its raw job id only.)"""
    path = cluster.root / "jobcomp.txt"
    assert path.is_file(), f"slurmctld wrote no job completion log ({path})\n{cluster.logs()}"
    jobs = {}
    for line in path.read_text().splitlines():
        record = dict(re.findall(r"(\w+)=(\S*)", line))
        array_task = record.get("ArrayTaskId", "")
        key = f"{record['ArrayJobId']}_{array_task}" if array_task.isdigit() else record["JobId"]
        jobs[key] = record
    return jobs


def tail(text: str, lines: int = 40) -> str:
    """The end of a command's output, for a failure message."""
    return "\n".join(text.splitlines()[-lines:])


def test_a_sweep_runs_each_setting_as_a_slurm_job_and_reports_both(slurm_cluster, tiny_model, tmp_path):
    tiny_model("tiny-qwen3")  # built before the jobs look for it (KVBENCH_CACHE reaches them through sbatch)
    sweep_dir = tmp_path / "sweep"
    args = ["--multirun", *SMOKE, f"arrival.concurrency={','.join(map(str, CONCURRENCIES))}", f"hydra.sweep.dir={sweep_dir}",
            "hydra/launcher=submitit_slurm", f"hydra.launcher.partition={PARTITION}", "hydra.launcher.gpus_per_node=0",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=5"]
    try:
        done = subprocess.run([sys.executable, "-m", "harness", *args], check=False, cwd=tmp_path, env=slurm_cluster.env,
                              capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        queue = slurm_cluster.client("squeue", "--all").stdout
        pytest.fail(f"the sweep did not end within {SWEEP_TIMEOUT_S} s; squeue:\n{queue}\n{slurm_cluster.logs()}\n"
                    f"stderr:\n{tail(e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr or '')}")
    assert done.returncode == 0, f"the sweep failed (status {done.returncode}):\n{tail(done.stderr)}\n{slurm_cluster.logs()}"

    # Every run directory names the Slurm job that wrote it (Hydra's job id is submitit's, ARRAY_TASK)...
    runs, unfinished = find_runs([sweep_dir])
    assert not unfinished, f"unfinished runs: {unfinished}"
    assert sorted(r.run["concurrency"] for r in runs) == list(CONCURRENCIES), [str(r.path) for r in runs]
    assert all(r.status == "ok" for r in runs), {str(r.path): r.status for r in runs}
    job_ids = {str(OmegaConf.load(r.path / ".hydra" / "hydra.yaml").hydra.job.id) for r in runs}
    assert len(job_ids) == len(CONCURRENCIES), f"the runs share a job id: {job_ids}"
    assert all(re.fullmatch(r"\d+_\d+", j) for j in job_ids), f"not Slurm array tasks (ARRAY_TASK): {job_ids}"

    # ...which slurmctld ran to completion on our partition...
    jobs = completed_jobs(slurm_cluster)
    for job_id in job_ids:
        assert job_id in jobs, f"Slurm has no record of job {job_id}; it knows {sorted(jobs)}"
        assert jobs[job_id]["JobState"] == "COMPLETED" and jobs[job_id]["Partition"] == PARTITION, jobs[job_id]
        # ...and submitit's side of the same job: it started inside Slurm and finished its task
        log = (sweep_dir / ".submitit" / job_id / f"{job_id}_0_log.out").read_text()
        assert f"JobEnvironment(job_id={job_id}," in log and "Job completed successfully" in log, log

    # The report written when the sweep ended aggregates both runs.
    written = sorted(p.name for p in sweep_dir.iterdir())
    assert {"runs.csv", "report.md"} <= set(written), f"no aggregated report in {sweep_dir}, only {written}"
    table = pd.read_csv(sweep_dir / "runs.csv")
    assert sorted(table["concurrency"]) == list(CONCURRENCIES) and set(table["status"]) == {"ok"}, table
    report = (sweep_dir / "report.md").read_text()
    assert f"from {len(CONCURRENCIES)} runs in {sweep_dir}" in report
    runs_section = report.split("## Runs", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in runs_section.splitlines() if line.startswith("| hf |")]
    assert [row.split("|")[2].strip() for row in rows] == [str(c) for c in CONCURRENCIES], runs_section

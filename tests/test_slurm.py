"""SLURM execution: the project's profile (slurm/config.yaml) on a real local cluster.

Start the cluster first (root, Debian):  bash scripts/slurm-local.sh start
Run:                                     pytest -m slurm tests/test_slurm.py -s

The `slurm`-marked tests are skipped unless `sinfo` answers. They use the project profile with the
test-only overrides layered on top (``--profile slurm --profile tests/slurm``):

* test_workflow_jobs_complete_on_slurm: a micro workflow (the project's ``workflow/configs/micro.yaml``
  study when the Snakefile and that config exist and DIFFBIAS_SLURM_TEST_TINY is not 1, else a
  self-contained tiny Snakefile) runs through
  the cluster; every ungrouped non-local job must be one SLURM job, every job group (the project's
  per-run evaluation groups and the ``train_small`` group, see slurm/config.yaml) one SLURM job whose own
  log shows its member jobs, and sacct must report each COMPLETED.
* test_timeout_then_resumed_retry: a group job (a counter with ``runtime: 1`` minute and a summary job)
  hits the time limit (TIMEOUT), is re-submitted with a longer runtime (``attempt * 1``) and the counter
  resumes from a side checkpoint file.

The timeout workflow takes about 3 minutes (SLURM checks time limits every ~30 s and the executor
plugin's status polling backs off by 10 s per round); it is started in the background by a module
fixture so that the first test runs meanwhile. The profile checks at the bottom need no cluster.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT_PROFILE = REPO / "slurm"
TEST_PROFILE = REPO / "tests" / "slurm"
MICRO_CONFIG = Path("workflow") / "configs" / "micro.yaml"

# keys tests/slurm/config.yaml may set on top of slurm/config.yaml (and nothing else)
ALLOWED_TEST_OVERRIDES = {
    "jobs",
    "latency-wait",
    "slurm-init-seconds-before-status-checks",
    "slurm-keep-successful-logs",
}
SACCT_FIELDS = "JobID,JobName,State,ExitCode,Partition,Account,Comment,AllocTRES"


def _cluster_up() -> tuple[bool, str]:
    if shutil.which("sinfo") is None:
        return False, "no `sinfo` on PATH (start the test cluster: bash scripts/slurm-local.sh start)"
    try:
        r = subprocess.run(["sinfo", "-h"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"`sinfo` failed ({e}); start the test cluster: bash scripts/slurm-local.sh start"
    if r.returncode != 0 or not r.stdout.strip():
        return False, (
            f"`sinfo` does not work ({r.stderr.strip() or 'no partitions'}); "
            "start the test cluster: bash scripts/slurm-local.sh start"
        )
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return False, "snakemake-executor-plugin-slurm is not installed"
    return True, ""


_UP, _WHY = _cluster_up()
if not _UP and os.environ.get("CI"):
    # In CI the cluster is started by `make test`; a missing cluster there is a failure, not a skip.
    raise RuntimeError(f"CI is set but the SLURM test cluster is not available: {_WHY}")


# --------------------------------------------------------------------------- helpers
def _default_partition() -> str:
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=True).stdout
    parts = out.split()
    return next((p.rstrip("*") for p in parts if p.endswith("*")), parts[0].rstrip("*"))


def _user_account() -> str | None:
    """An account the current user may submit to (sacctmgr association), if any."""
    user = os.environ.get("USER") or __import__("getpass").getuser()
    r = subprocess.run(
        ["sacctmgr", "-n", "-P", "-s", "list", "user", user, "format=account"],
        capture_output=True, text=True,
    )
    accounts = [a.strip() for a in r.stdout.split() if a.strip()]
    return accounts[0] if r.returncode == 0 and accounts else None


def _cluster_gpus() -> int:
    out = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True).stdout
    m = re.search(r"gpu(?::[^:\s,()]+)?:(\d+)", out)
    return int(m.group(1)) if m else 0


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIFFBIAS_SLURM_", "SBATCH_"))}
    # as with an activated venv: job scripts call `python`/`diffbias` from this interpreter's bin/
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra)
    return env


def _snakemake_cmd(*args: str) -> list[str]:
    return [
        sys.executable, "-m", "snakemake",
        "--cores", "all",
        "--profile", str(PROJECT_PROFILE),
        "--profile", str(TEST_PROFILE),
        *args,
    ]


def _run_snakemake(cmd: list[str], *, cwd: Path, env: dict[str, str], timeout: float, out: Path):
    """Run snakemake with output to `out`; on timeout stop it with SIGTERM (it then cancels its SLURM
    jobs) and scancel whatever it had submitted. Returns (returncode or None, log text, seconds)."""
    t0 = time.monotonic()
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
        rc = _wait_or_stop(proc, timeout, out)
    return rc, out.read_text(), time.monotonic() - t0


def _wait_or_stop(proc: subprocess.Popen, timeout: float, out: Path) -> int | None:
    try:
        return proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        ids = _submitted_jobids(out.read_text())
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True)
        return None


def _submitted_jobids(log: str) -> list[str]:
    return re.findall(r"has been submitted with SLURM jobid (\d+)", log)


def _sacct(jobids: list[str]) -> list[dict[str, str]]:
    """Allocation rows (-X) for jobids; retries briefly because slurmdbd may lag a little."""
    names = SACCT_FIELDS.split(",")
    rows: list[dict[str, str]] = []
    for _ in range(20):
        out = subprocess.run(
            ["sacct", "-X", "-P", "-n", f"--format={SACCT_FIELDS}", "-j", ",".join(jobids)],
            capture_output=True, text=True, check=True,
        ).stdout
        rows = [dict(zip(names, line.split("|"))) for line in out.splitlines() if line.strip()]
        if len(rows) >= len(jobids) and all(r["State"] not in ("PENDING", "RUNNING") for r in rows):
            break
        time.sleep(1)
    return rows


def _sacct_listing(jobids: list[str], comment: bool = False) -> str:
    """The plain listing (all steps) for the record: sacct --format=JobID,JobName,State,ExitCode[,Comment]."""
    fields = "JobID,JobName,State,ExitCode,Elapsed,Timelimit" + (",Comment%90" if comment else "")
    return subprocess.run(
        ["sacct", f"--format={fields}", "-P", "-n", "-j", ",".join(jobids)],
        capture_output=True, text=True,
    ).stdout


def _group_jobs(log: str) -> dict[str, list[str]]:
    """Group jobs announced in snakemake's log: group id -> the rules of its member jobs."""
    groups: dict[str, list[str]] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Group job (\S+) \(jobs in lexicogr\. order\):", line)
        if m:
            current = groups.setdefault(m.group(1), [])
            continue
        m = re.match(r"    rule (\w+):$", line)
        if m and current is not None:
            current.append(m.group(1))
        elif re.match(r"(local)?rule \w+:$", line):  # the next job outside any group
            current = None
    return groups


def _rules_in_slurm_log(wd: Path, jobid: str) -> Counter:
    """Rules the job step's Snakemake ran inside SLURM job `jobid` (its log under .snakemake/slurm_logs)."""
    logs = list((wd / ".snakemake" / "slurm_logs").rglob(f"{jobid}.log"))
    assert len(logs) == 1, (jobid, logs)
    text = logs[0].read_text(errors="replace")
    return Counter(re.findall(r"^(?:local)?rule (\w+):$", text, flags=re.M))


# --------------------------------------------------------------------------- tiny workflows
TINY_SNAKEFILE = textwrap.dedent(
    """
    # tiny self-contained workflow: 4 SLURM jobs (3 CPU, 1 GPU if the cluster has one) + 2 local
    GPUS = int(config.get("gpus", 0))
    localrules: all, summary

    rule all:
        input: "summary.txt"

    rule part:
        output: "parts/{i}.txt"
        resources: mem_mb=300, runtime=2
        shell: "echo part {wildcards.i} $SLURM_JOB_ID > {output}"

    rule gpu_probe:
        output: "gpu.txt"
        resources: mem_mb=300, runtime=2, gpu=GPUS
        shell: "echo gpu_probe $SLURM_JOB_ID > {output}"

    rule combine:
        input: expand("parts/{i}.txt", i=range(2)), "gpu.txt"
        output: "combined.txt"
        threads: 1
        resources: mem_mb=300, runtime=2
        shell: "cat {input} > {output}; echo combine $SLURM_JOB_ID >> {output}"

    rule summary:
        input: "combined.txt"
        output: "summary.txt"
        shell: "cp {input} {output}; echo summary ${{SLURM_JOB_ID:-local}} >> {output}"
    """
)

# counts to TOTAL steps (1 s each), checkpointing to an undeclared side file that survives
# snakemake's deletion of outputs; a TIMEOUT kills it mid-way, the retry resumes
RESUMABLE_TOTAL = 110  # > ~90 s + slack: attempt 1 (1 min limit, checked every ~30 s) cannot finish
COUNTER_PY = textwrap.dedent(
    """
    import os, sys, time
    out, ckpt, total, runtime = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    start = int(open(ckpt).read()) if os.path.exists(ckpt) else 0
    with open(ckpt + ".history", "a") as h:
        h.write(f"start={start} runtime={runtime} job={os.environ.get('SLURM_JOB_ID')}\\n")
    n = start
    while n < total:
        time.sleep(1)
        n += 1
        with open(ckpt + ".tmp", "w") as f:
            f.write(str(n))
        os.replace(ckpt + ".tmp", ckpt)
    with open(out, "w") as f:
        f.write(f"start={start} end={n} runtime={runtime} job={os.environ.get('SLURM_JOB_ID')}\\n")
    """
)
RESUMABLE_SNAKEFILE = textwrap.dedent(
    f"""
    # one group job (as the project's evaluation groups): the group's time limit is the sum of its
    # members' runtimes (1 min x attempt + 0), its retry resumes the counter
    rule summary:
        input: "resumed.txt"
        output: "summary.txt"
        group: "timed"
        resources: mem_mb=300, runtime=0
        shell: "cp {{input}} {{output}}"

    rule resumable:
        output: "resumed.txt"
        group: "timed"
        params: ckpt="checkpoints/counter"   # side path, not a declared output
        resources: mem_mb=300, runtime=lambda wc, attempt: attempt * 1   # minutes
        shell:
            "mkdir -p checkpoints && python3 counter.py {{output}} {{params.ckpt}} "
            "{RESUMABLE_TOTAL} {{resources.runtime}}"
    """
)


@pytest.fixture(scope="module")
def resumable_run(tmp_path_factory):
    """Start the TIMEOUT/retry workflow in the background; yields a function that waits for it."""
    if not _UP:
        pytest.skip(_WHY)
    wd = tmp_path_factory.mktemp("slurm_resumable")
    (wd / "Snakefile").write_text(RESUMABLE_SNAKEFILE)
    (wd / "counter.py").write_text(COUNTER_PY)
    out = wd / "snakemake.out"
    logf = open(out, "w")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        _snakemake_cmd("--retries", "1", "--directory", str(wd), "-s", str(wd / "Snakefile")),
        cwd=wd, env=_env(), stdout=logf, stderr=subprocess.STDOUT, text=True,
    )

    def wait(timeout: float = 480):
        rc = _wait_or_stop(proc, timeout - (time.monotonic() - t0), out)
        logf.flush()
        return rc, out.read_text(), wd, time.monotonic() - t0

    yield wait
    if proc.poll() is None:
        _wait_or_stop(proc, 0, out)
    logf.close()


# --------------------------------------------------------------------------- (a) workflow
@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.skipif(not _UP, reason=_WHY or "SLURM cluster not available")
@pytest.mark.usefixtures("resumable_run")  # starts the slow timeout workflow in the background first
def test_workflow_jobs_complete_on_slurm(tmp_path):
    partition = _default_partition()
    account = _user_account()
    env = _env(DIFFBIAS_SLURM_PARTITION=partition, **({"DIFFBIAS_SLURM_ACCOUNT": account} if account else {}))

    use_project = (
        (REPO / "Snakefile").is_file()
        and (REPO / MICRO_CONFIG).is_file()
        and os.environ.get("DIFFBIAS_SLURM_TEST_TINY") != "1"  # 1: the quick tiny workflow instead
    )
    if use_project:
        # the project's micro study, in a scratch copy of the repository (results stay out of REPO)
        wd = tmp_path / "repo"
        shutil.copytree(
            REPO, wd,
            ignore=shutil.ignore_patterns(
                ".git", ".venv", ".snakemake", "results", ".pytest_cache", "__pycache__", "*.egg-info",
                ".cache", "build",
            ),
        )
        args = ["--configfile", str(MICRO_CONFIG), "--directory", str(wd), "-s", str(wd / "Snakefile")]
        timeout = 840
    else:
        wd = tmp_path / "tiny"
        wd.mkdir()
        (wd / "Snakefile").write_text(TINY_SNAKEFILE)
        args = ["--config", f"gpus={min(1, _cluster_gpus())}", "--directory", str(wd), "-s", str(wd / "Snakefile")]
        timeout = 300

    rc, log, wall = _run_snakemake(_snakemake_cmd(*args), cwd=wd, env=env, timeout=timeout,
                                   out=tmp_path / "snakemake.out")
    assert rc == 0, f"snakemake failed (rc {rc}, None = timed out after {wall:.0f}s):\n{log[-6000:]}"

    nonlocal_jobs = re.findall(r"^rule (\w+):$", log, flags=re.M)  # ungrouped: one SLURM job each
    groups = _group_jobs(log)  # group id -> its member rules: one SLURM job per group
    local_jobs = re.findall(r"^localrule (\w+):$", log, flags=re.M)
    jobids = _submitted_jobids(log)
    assert nonlocal_jobs or groups, f"no non-local job ran:\n{log[-4000:]}"
    assert "Trying to restart" not in log, "a job failed and was retried"
    assert len(jobids) == len(nonlocal_jobs) + len(groups), (nonlocal_jobs, groups, jobids)

    rows = _sacct(jobids)
    members = sum(len(m) for m in groups.values())
    print(f"\n[{'project micro study' if use_project else 'tiny Snakefile'}] {wall:.0f}s; {len(jobids)} SLURM jobs "
          f"for {len(nonlocal_jobs) + members} non-local jobs ({len(groups)} group jobs holding {members}); "
          f"local rules: {sorted(set(local_jobs))}\n" + _sacct_listing(jobids, comment=True))
    assert sorted(r_["JobID"] for r_ in rows) == sorted(jobids), rows
    for row in rows:
        assert row["State"] == "COMPLETED" and row["ExitCode"] == "0:0", row
        assert row["Partition"] == partition, row  # DIFFBIAS_SLURM_PARTITION reached sbatch -p
        if account:
            assert row["Account"] == account, row  # DIFFBIAS_SLURM_ACCOUNT reached sbatch -A
    # The plugin names every job after the workflow run (JobName = run UUID) and says what it is in the
    # comment: `rule_<rule>_wildcards_<...>` for a single job, `rule_<group id>_<member rules>` for a group.
    group_rows = {g: [r_ for r_ in rows if r_["Comment"].startswith(f"rule_{g}_")] for g in groups}
    assert all(len(found) == 1 for found in group_rows.values()), group_rows
    single = [r_ for r_ in rows if not any(r_ in found for found in group_rows.values())]
    by_rule = Counter(re.match(r"rule_(\w+?)(?:_wildcards_.*)?$", row["Comment"]).group(1) for row in single)
    assert by_rule == Counter(nonlocal_jobs), (by_rule, nonlocal_jobs)
    assert not set(local_jobs) & (set(by_rule) | {m for ms in groups.values() for m in ms}), \
        "a localrule was submitted to SLURM"
    # every member of a group ran inside its group's SLURM job (the job step's own Snakemake log says so)
    for g, found in group_rows.items():
        ran = _rules_in_slurm_log(wd, found[0]["JobID"])
        assert ran == Counter(groups[g]), (g, ran, groups[g])

    if use_project:
        # the per-run evaluations are one SLURM job per run, the N = 10 trainings share one
        runs = {Path(p).parts[-4:] for p in (wd / "results/runs").glob("*/*/N*/seed*")}
        evals = {g for g in groups if g.startswith("eval_")}
        assert len(evals) == len(runs) == 4, (evals, runs)
        assert sorted(groups["train_small"]) == ["train", "train"], groups
        assert Counter(nonlocal_jobs)["train"] == 2 and "psnr_gap" not in nonlocal_jobs, nonlocal_jobs
        assert len(jobids) < len(nonlocal_jobs) + members

    if not use_project:
        # each job recorded the SLURM job id it ran under; local rules ran outside SLURM
        recorded = [line.split() for line in (wd / "summary.txt").read_text().splitlines() if line.strip()]
        assert recorded[-1] == ["summary", "local"], recorded
        assert sorted(line[-1] for line in recorded[:-1]) == sorted(jobids), (recorded, jobids)
        gpu_rows = [row for row in rows if row["Comment"] == "rule_gpu_probe"]
        if _cluster_gpus():
            assert "gres/gpu=1" in gpu_rows[0]["AllocTRES"], gpu_rows  # `gpu: 1` became --gpus=1
        cpu_rows = [row for row in rows if row["Comment"] != "rule_gpu_probe"]
        assert all("gres/gpu" not in row["AllocTRES"] for row in cpu_rows), cpu_rows


# --------------------------------------------------------------------------- (b) TIMEOUT + resume
@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.skipif(not _UP, reason=_WHY or "SLURM cluster not available")
def test_timeout_then_resumed_retry(resumable_run):
    rc, log, wd, wall = resumable_run()
    assert rc == 0, f"snakemake failed (rc {rc}) after {wall:.0f}s:\n{log[-6000:]}"
    jobids = _submitted_jobids(log)
    assert len(jobids) == 2, f"expected exactly one retry, got SLURM jobs {jobids}:\n{log[-4000:]}"
    rows = {row["JobID"]: row for row in _sacct(jobids)}
    elapsed = re.search(r"Elapsed time: (\S+)", log)
    print(f"\n[timeout + resumed retry] snakemake took {elapsed.group(1) if elapsed else '?'}\n"
          + _sacct_listing(jobids))
    first, second = rows[jobids[0]], rows[jobids[1]]
    assert first["State"] == "TIMEOUT", first
    assert second["State"] == "COMPLETED" and second["ExitCode"] == "0:0", second
    assert first["Comment"] == second["Comment"] == "rule_timed_resumable_summary"  # one group job, twice
    groups = _group_jobs(log)  # announced once per submission
    assert list(groups) == ["timed"] and groups["timed"] == ["resumable", "summary"] * 2, groups
    assert (wd / "summary.txt").read_text() == (wd / "resumed.txt").read_text()
    # (for a group job Snakemake logs "Error in group <id>", not the plugin's SLURM status: sacct says TIMEOUT)
    assert "Error in group timed" in log and "Trying to restart" in log

    # the retry resumed from the side checkpoint instead of starting over
    out = dict(kv.split("=") for kv in (wd / "resumed.txt").read_text().split())
    assert 0 < int(out["start"]) < RESUMABLE_TOTAL, out
    assert int(out["end"]) == RESUMABLE_TOTAL and out["runtime"] == "2" and out["job"] == jobids[1], out
    history = (wd / "checkpoints" / "counter.history").read_text().splitlines()
    assert history == [
        f"start=0 runtime=1 job={jobids[0]}",
        f"start={out['start']} runtime=2 job={jobids[1]}",
    ], history


# --------------------------------------------------------------------------- profiles (no cluster)
def _parse_profile(path: Path) -> dict:
    profiles = pytest.importorskip("snakemake.profiles")
    with open(path) as f:
        return dict(profiles.ProfileConfigFileParser().parse(f))


def test_project_profile_settings(monkeypatch):
    for var in ("DIFFBIAS_SLURM_PARTITION", "DIFFBIAS_SLURM_ACCOUNT", "DIFFBIAS_SLURM_GPU_MODEL",
                "SBATCH_PARTITION", "SBATCH_ACCOUNT"):
        monkeypatch.delenv(var, raising=False)
    p = _parse_profile(PROJECT_PROFILE / "config.yaml")
    assert p["executor"] == "slurm" and int(p["jobs"]) > 0
    assert p["rerun-incomplete"] == "True" and p["keep-going"] == "True" and p["printshellcmds"] == "True"
    assert int(p["latency-wait"]) == 60 and int(p["retries"]) == 2
    # job groups: every `group:` pattern of the rules spans its disconnected pieces (see the rules)
    components = dict(entry.split("=") for entry in p["group-components"])
    patterns = set(re.findall(r'^\s+group: "(.+?)"', "".join(
        f.read_text() for f in sorted((REPO / "workflow" / "rules").glob("*.smk"))), flags=re.M))
    assert patterns == {"eval_{dataset}_{variant}_N{n}_seed{seed}"}, patterns
    assert {k: int(v) for k, v in components.items()} == {"eval_{dataset}_{variant}_N{n}_seed{seed}": 100, "train_small": 3}
    # nothing site-specific unless the environment says so
    assert not any(r.startswith(("slurm_partition=", "slurm_account=")) for r in p["default-resources"])
    assert "set-resources" not in p

    monkeypatch.setenv("SBATCH_PARTITION", "ignored")
    monkeypatch.setenv("DIFFBIAS_SLURM_PARTITION", "max")  # a Python builtin name: must stay a string
    monkeypatch.setenv("SBATCH_ACCOUNT", "proj42")
    monkeypatch.setenv("DIFFBIAS_SLURM_GPU_MODEL", "a100")
    p = _parse_profile(PROJECT_PROFILE / "config.yaml")
    assert "slurm_partition='max'" in p["default-resources"]
    assert "slurm_account='proj42'" in p["default-resources"]
    assert p["set-resources"] == ["train:gpu_model='a100'"]


def test_test_profile_only_overrides():
    """tests/slurm is layered on slurm/ (later --profile wins per top-level key): it may only
    change the documented test settings, so the tests run the project's profile otherwise."""
    raw = yaml.safe_load((TEST_PROFILE / "config.yaml").read_text())
    assert set(raw) <= ALLOWED_TEST_OVERRIDES, set(raw) - ALLOWED_TEST_OVERRIDES
    project = _parse_profile(PROJECT_PROFILE / "config.yaml")
    test = _parse_profile(TEST_PROFILE / "config.yaml")
    merged = {**project, **test}
    for key, value in project.items():
        if key not in ALLOWED_TEST_OVERRIDES:
            assert merged[key] == value, key
    assert int(merged["slurm-init-seconds-before-status-checks"]) == 2


def test_group_jobs_request_one_gpu_whatever_cores(tmp_path):
    """`snakemake --cores all --profile slurm`: each group job of a GPU config asks for one GPU (its GPU
    members run one after another) and the sum of their runtimes. Computed by Snakemake's own group layout
    in cluster mode (a dry run lays groups out as local jobs, so the layout is forced to the cluster's)."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    cfg = yaml.safe_load((REPO / MICRO_CONFIG).read_text())
    cfg["resources"] = {"train": {"runtime": 10, "mem_mb": 1000, "gpu": 1},
                        "evaluate": {"runtime": 10, "mem_mb": 1000, "gpu": 1}}
    (tmp_path / "gpu.yaml").write_text(yaml.safe_dump(cfg))
    probe = textwrap.dedent("""
        import sys
        import snakemake.jobs as J
        import snakemake.resources as R
        basic = R.GroupResources.basic_layered.__func__
        R.GroupResources.basic_layered = classmethod(lambda cls, *a, **k: basic(cls, *a, **{**k, "run_local": False}))
        log_info = J.GroupJob.log_info
        def report(self, *a, **k):
            r = dict(self.resources)
            print("GROUP", self.groupid, r.get("gpu"), r.get("runtime"), len(self.jobs), flush=True)
            return log_info(self, *a, **k)
        J.GroupJob.log_info = report
        from snakemake.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    (tmp_path / "probe.py").write_text(probe)
    r = subprocess.run([sys.executable, "probe.py", "-n", "-s", str(REPO / "Snakefile"), "--cores", "64",
                        "--profile", str(PROJECT_PROFILE), "--configfile", "gpu.yaml"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    groups = {line.split()[1]: tuple(map(int, line.split()[2:])) for line in r.stdout.splitlines()
              if line.startswith("GROUP ")}
    assert groups and any(name.startswith("eval_") for name in groups) and "train_small" in groups, r.stdout[-2000:]
    for name, (gpu, runtime, members) in groups.items():
        assert gpu == 1, (name, gpu)
        assert runtime >= 10 * members, (name, runtime, members)  # members run one after another: runtimes add


def test_a_training_on_several_gpus_asks_for_them_on_one_node(tmp_path):
    """`training.gpus_per_run: 4` becomes `sbatch ... --nodes=1 ... --gpus=4` for that train job: the profile's GPU
    serialisation (the one-slot resource gpu_slot) does not cap `gpu`, and the job stays on one node. The sbatch
    arguments are the SLURM plugin's own (get_submit_command, set_gres_string) on the jobs of a dry run with the
    project profile; the evaluation groups still ask for one GPU."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    cfg = yaml.safe_load((REPO / MICRO_CONFIG).read_text())
    cfg["resources"] = {"train": {"runtime": 10, "mem_mb": 1000, "gpu": 1},
                        "evaluate": {"runtime": 10, "mem_mb": 1000, "gpu": 1}}
    cfg["variants"]["dit"]["training"] = {"gpus_per_run": 4}  # batch 8: 2 samples per rank
    (tmp_path / "gpus.yaml").write_text(yaml.safe_dump(cfg))
    probe = textwrap.dedent("""
        import sys
        import snakemake.jobs as J
        import snakemake.resources as R
        from snakemake_executor_plugin_slurm.submit_string import get_submit_command
        basic = R.GroupResources.basic_layered.__func__  # lay groups out as on the cluster, not as a local run
        R.GroupResources.basic_layered = classmethod(lambda cls, *a, **k: basic(cls, *a, **{**k, "run_local": False}))
        from snakemake_executor_plugin_slurm.utils import set_gres_string
        params = {"run_uuid": "u", "slurm_logfile": "log", "comment_str": "c", "account": "", "partition": "",
                  "workdir": "."}
        log_info = J.Job.log_info
        def report(self, *a, **k):
            if self.rule.name == "train":
                call = get_submit_command(self, params) + set_gres_string(self)
                print("SBATCH", self.wildcards_dict["variant"], self.wildcards_dict["n"], call, flush=True)
            return log_info(self, *a, **k)
        J.Job.log_info = report
        group_info = J.GroupJob.log_info
        def group(self, *a, **k):
            print("GROUP", self.groupid, dict(self.resources).get("gpu"), flush=True)
            return group_info(self, *a, **k)
        J.GroupJob.log_info = group
        from snakemake.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    (tmp_path / "probe.py").write_text(probe)
    r = subprocess.run([sys.executable, "probe.py", "-n", "-s", str(REPO / "Snakefile"), "--cores", "64",
                        "--profile", str(PROJECT_PROFILE), "--configfile", "gpus.yaml"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    calls = {tuple(line.split()[1:3]): line for line in r.stdout.splitlines() if line.startswith("SBATCH ")}
    assert set(calls) == {("dit", "10"), ("dit", "50"), ("dit_local", "10"), ("dit_local", "50")}, r.stdout[-2000:]
    for n in ("10", "50"):  # even at N = 10: a training on several GPUs is never bundled into train_small
        assert " --gpus=4" in calls["dit", n] and " --nodes=1" in calls["dit", n], calls["dit", n]
        assert " --gpus=1" in calls["dit_local", n] and "--nodes" not in calls["dit_local", n], calls["dit_local", n]
    groups = [line.split() for line in r.stdout.splitlines() if line.startswith("GROUP ")]
    assert groups and all(gpu == "1" for _, _, gpu in groups), groups  # the evaluation groups: one GPU each

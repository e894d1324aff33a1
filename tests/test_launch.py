"""Tests for launch/local.sh, launch/tpu_vm.sh and .ci/run.

No cloud, no network, no real install: tpu_vm.sh runs with --dry-run (or with a
fake gcloud on PATH) and local.sh runs against a fake venv whose python and
evejax only record how they were called.
"""
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL_SH = REPO / "launch" / "local.sh"
TPU_VM_SH = REPO / "launch" / "tpu_vm.sh"
CI_RUN = REPO / ".ci" / "run"
SCRIPTS = [LOCAL_SH, TPU_VM_SH, CI_RUN]


def _write_exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def fake_gcloud(tmp_path):
    """A gcloud on PATH that records its arguments, one call a line."""
    calls = tmp_path / "gcloud_calls"
    bin_dir = tmp_path / "fakebin"
    _write_exe(bin_dir / "gcloud", f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" >>{shlex.quote(str(calls))}\n')
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return env, calls


def tpu_vm(*args, env=None, check=True):
    proc = subprocess.run(
        ["bash", str(TPU_VM_SH), *args], capture_output=True, text=True, env=env, timeout=60
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def dry_run(*args, env=None):
    """The printed commands of a --dry-run, each split into words as a shell would."""
    proc = tpu_vm("--dry-run", *args, env=env)
    lines = proc.stdout.splitlines()
    assert lines, proc.stderr
    assert all(line.startswith("+ ") for line in lines), lines
    return [shlex.split(line[2:]) for line in lines]


def gcloud_calls(commands, *subcommand):
    """The printed gcloud commands that start with `gcloud compute tpus SUBCOMMAND...`."""
    head = ["gcloud", "compute", "tpus", *subcommand]
    return [c for c in commands if c[: len(head)] == head]


def flag(command, name):
    values = [w.split("=", 1)[1] for w in command if w.startswith(f"--{name}=")]
    assert len(values) == 1, (name, command)
    return values[0]


# --- static checks ---------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _shellcheck():
    path = os.pathsep.join([str(Path(sys.prefix) / "bin"), os.environ.get("PATH", "")])
    found = shutil.which("shellcheck", path=path)
    assert found, "shellcheck not found: it comes with the test extra (pip install -e '.[test]')"
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script):
    proc = subprocess.run(
        [_shellcheck(), "--shell=bash", "--severity=style", str(script)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ci_run_is_the_readme_test_command():
    lines = [l.strip() for l in CI_RUN.read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert lines[-1].endswith("bash launch/local.sh test"), lines


# --- tpu_vm.sh -----------------------------------------------------------------

SLICE = ["--name", "eve-pod", "--zone", "us-east5-a", "--project", "my-proj"]
TRAIN = ["train", "--config", "configs/eve.py:7b_stage1", "--workdir", "gs://bucket/eve/stage1"]


def test_all_v5p_64_spot(fake_gcloud):
    env, calls = fake_gcloud
    commands = dry_run("all", *SLICE, "--accelerator-type", "v5p-64", "--spot", "--", *TRAIN, env=env)
    assert not calls.exists(), "--dry-run must not run gcloud"

    (create,) = gcloud_calls(commands, "tpu-vm", "create")
    assert create[5] == "eve-pod"
    assert flag(create, "accelerator-type") == "v5p-64"
    assert flag(create, "version") == "v2-alpha-tpuv5"
    assert flag(create, "zone") == "us-east5-a"
    assert flag(create, "project") == "my-proj"
    assert "--spot" in create

    (scp,) = gcloud_calls(commands, "tpu-vm", "scp")
    assert flag(scp, "worker") == "all"
    assert scp[5].endswith(".tar.gz") and scp[6] == "eve-pod:evejax.tar.gz"

    sshs = gcloud_calls(commands, "tpu-vm", "ssh")
    assert len(sshs) == 3  # unpack, setup, run
    assert all(s[5] == "eve-pod" and flag(s, "worker") == "all" for s in sshs)
    unpack, setup, train = (flag(s, "command") for s in sshs)
    assert "tar -xzf evejax.tar.gz -C evejax" in unpack
    assert "EVEJAX_EXTRAS=tpu bash launch/local.sh setup" in setup
    assert "EVEJAX_DISTRIBUTED=1" in train
    assert "bash launch/local.sh " + shlex.join(TRAIN) in train
    assert "tee -a" in train and "$(hostname).log" in train

    order = [c[4] if c[0] == "gcloud" else c[0] for c in commands]
    assert order == ["create", "tar", "scp", "ssh", "ssh", "ssh"]


def test_v4_8_is_single_host_with_its_own_runtime():
    commands = dry_run("create", *SLICE, "--accelerator-type", "v4-8")
    (create,) = commands
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "eve-pod"]
    assert flag(create, "accelerator-type") == "v4-8"
    assert flag(create, "version") == "tpu-ubuntu2204-base"
    assert "--spot" not in create

    (run,) = dry_run("run", *SLICE, "--accelerator-type", "v4-8", "--", *TRAIN)
    assert flag(run, "worker") == "all"
    assert "EVEJAX_DISTRIBUTED" not in flag(run, "command")


@pytest.mark.parametrize(
    "accelerator, runtime, multi_host",
    [
        ("v4-8", "tpu-ubuntu2204-base", False),
        ("v4-16", "tpu-ubuntu2204-base", True),
        ("v3-32", "tpu-ubuntu2204-base", True),
        ("v5p-8", "v2-alpha-tpuv5", False),
        ("v5p-64", "v2-alpha-tpuv5", True),
        ("v5litepod-8", "v2-alpha-tpuv5-lite", False),
        ("v5litepod-256", "v2-alpha-tpuv5-lite", True),
        ("v6e-8", "v2-alpha-tpuv6e", False),
        ("v6e-256", "v2-alpha-tpuv6e", True),
    ],
)
def test_runtime_and_hosts_per_type(accelerator, runtime, multi_host):
    (create,) = dry_run("create", *SLICE, "--accelerator-type", accelerator)
    assert flag(create, "version") == runtime
    (run,) = dry_run("run", *SLICE, "--accelerator-type", accelerator, "--", "train")
    assert ("EVEJAX_DISTRIBUTED=1" in flag(run, "command")) == multi_host


def test_version_flag_overrides_default_and_unknown_type_needs_it():
    (create,) = dry_run("create", *SLICE, "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5-custom")
    assert flag(create, "version") == "v2-alpha-tpuv5-custom"
    proc = tpu_vm("create", *SLICE, "--accelerator-type", "v9z-8", "--dry-run", check=False)
    assert proc.returncode != 0 and "--version" in proc.stderr
    (create,) = dry_run("create", *SLICE, "--accelerator-type", "v9z-8", "--version", "some-runtime")
    assert flag(create, "version") == "some-runtime"


def test_queued_spot_create_and_delete():
    commands = dry_run("create", *SLICE, "--accelerator-type", "v5p-64", "--spot", "--queued")
    assert not gcloud_calls(commands, "tpu-vm")
    (create,) = gcloud_calls(commands, "queued-resources", "create")
    assert create[5] == "eve-pod"
    assert flag(create, "node-id") == "eve-pod"
    assert flag(create, "accelerator-type") == "v5p-64"
    assert flag(create, "runtime-version") == "v2-alpha-tpuv5"
    assert "--spot" in create
    (describe,) = gcloud_calls(commands, "queued-resources", "describe")
    assert flag(describe, "format") == "value(state.state)"

    (delete,) = dry_run("delete", *SLICE, "--queued")
    assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "eve-pod"]
    assert "--force" in delete and "--quiet" in delete


def test_queued_without_spot():
    commands = dry_run("create", *SLICE, "--accelerator-type", "v4-8", "--queued")
    (create,) = gcloud_calls(commands, "queued-resources", "create")
    assert "--spot" not in create
    assert flag(create, "runtime-version") == "tpu-ubuntu2204-base"


def test_delete():
    (delete,) = dry_run("delete", *SLICE)
    assert delete == [
        "gcloud", "compute", "tpus", "tpu-vm", "delete", "eve-pod",
        "--zone=us-east5-a", "--project=my-proj", "--quiet",
    ]


def test_copy_with_git_clones_on_every_worker():
    (ssh,) = dry_run("copy", *SLICE, "--git", "https://example.com/evejax.git")
    assert flag(ssh, "worker") == "all"
    assert "git clone https://example.com/evejax.git evejax" in flag(ssh, "command")


def test_logs_stop_status():
    (logs,) = dry_run("logs", *SLICE, "--worker", "3", "--follow")
    assert flag(logs, "worker") == "3"
    assert flag(logs, "command").startswith("tail -n 100 -F evejax/logs/eve-pod.")
    (stop,) = dry_run("stop", *SLICE)
    assert flag(stop, "worker") == "all" and "kill -TERM" in flag(stop, "command")
    (status,) = dry_run("status", *SLICE)
    assert status[3:6] == ["tpu-vm", "describe", "eve-pod"]


def test_without_dry_run_gcloud_runs_the_same_commands(fake_gcloud):
    env, calls = fake_gcloud
    tpu_vm("delete", *SLICE, env=env)
    tpu_vm("create", *SLICE, "--accelerator-type", "v4-8", "--spot", env=env)
    assert calls.read_text().splitlines() == [
        "compute tpus tpu-vm delete eve-pod --zone=us-east5-a --project=my-proj --quiet",
        "compute tpus tpu-vm create eve-pod --zone=us-east5-a --project=my-proj"
        " --accelerator-type=v4-8 --version=tpu-ubuntu2204-base --spot",
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["create", "--zone", "z", "--accelerator-type", "v4-8"], "--name"),
        (["create", "--name", "n", "--accelerator-type", "v4-8"], "--zone"),
        (["create", "--name", "n", "--zone", "z"], "--accelerator-type"),
        (["run", "--name", "n", "--zone", "z", "--accelerator-type", "v4-8"], "after --"),
        (["launch", "--name", "n", "--zone", "z"], "unknown command"),
        (["create", "--name", "n", "--zone", "z", "--colour", "red"], "unknown flag"),
        (["create", "--name", "n", "--zone", "z", "--accelerator-type", "big"], "FAMILY-SIZE"),
    ],
)
def test_bad_arguments_fail_with_a_message(args, message, fake_gcloud):
    env, calls = fake_gcloud
    proc = tpu_vm("--dry-run", *args, env=env, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not calls.exists()


def _fake_checkout(tmp_path):
    """A home dir holding ~/evejax with a local.sh that records argv, cwd and env."""
    home = tmp_path / "home"
    record = tmp_path / "record"
    _write_exe(
        home / "evejax" / "launch" / "local.sh",
        "#!/usr/bin/env bash\n"
        f'{{ printf "%s\\n" "$@"; echo "cwd=$PWD"; env | grep ^EVEJAX_ | sort; }} >{shlex.quote(str(record))}\n'
        'echo "step 1 loss 2.5"\n',
    )
    return home, record


def test_remote_run_command_passes_arguments_through_intact(tmp_path):
    """The printed --command, run by a shell as ssh would, gives evejax exactly our arguments."""
    home, record = _fake_checkout(tmp_path)
    tricky = ["train", "--config", "configs/eve.py:tiny", "--config.data.name=it's a $(test)", "a b"]
    (run,) = dry_run("run", *SLICE, "--accelerator-type", "v5p-64", "--", *tricky)
    proc = subprocess.run(
        ["bash", "-c", flag(run, "command")], cwd=home, capture_output=True, text=True, timeout=60,
        env=dict(os.environ, HOME=str(home)),
    )
    assert proc.returncode == 0, proc.stderr
    assert "step 1 loss 2.5" in proc.stdout  # streamed
    lines = record.read_text().splitlines()
    assert lines[: len(tricky)] == tricky
    assert f"cwd={home / 'evejax'}" in lines
    assert "EVEJAX_DISTRIBUTED=1" in lines and "EVEJAX_EXTRAS=tpu" in lines
    (log,) = (home / "evejax" / "logs").glob("eve-pod.*.log")
    assert log.name == f"eve-pod.{subprocess.check_output(['hostname'], text=True).strip()}.log"
    assert "step 1 loss 2.5" in log.read_text()


def test_remote_run_command_fails_when_evejax_fails(tmp_path):
    home, _ = _fake_checkout(tmp_path)
    script = home / "evejax" / "launch" / "local.sh"
    script.write_text(script.read_text() + "exit 3\n")
    (run,) = dry_run("run", *SLICE, "--accelerator-type", "v4-8", "--", "train")
    proc = subprocess.run(["bash", "-c", flag(run, "command")], cwd=home, capture_output=True, text=True)
    assert proc.returncode == 3


# --- local.sh and .ci/run (fake venv: no install happens) -------------------------------


@pytest.fixture
def fake_repo(tmp_path):
    """A copy of launch/local.sh and .ci/run beside a setup.cfg and a fake .venv."""
    root = tmp_path / "repo"
    (root / "launch").mkdir(parents=True)
    (root / ".ci").mkdir()
    shutil.copy(LOCAL_SH, root / "launch" / "local.sh")
    shutil.copy(CI_RUN, root / ".ci" / "run")
    (root / "setup.cfg").write_text("[metadata]\nname = evejax\n")
    calls = tmp_path / "calls"
    real_python = shlex.quote(sys.executable)
    _write_exe(
        root / ".venv" / "bin" / "python",
        "#!/usr/bin/env bash\n"
        f'if [ "$1" = -c ]; then exec {real_python} "$@"; fi\n'
        f'echo "python $* (cwd=$PWD)" >>{shlex.quote(str(calls))}\n'
        'if [ "$1 $2" = "-m pytest" ]; then exit "${FAKE_PYTEST_RC:-0}"; fi\n',
    )
    _write_exe(
        root / ".venv" / "bin" / "evejax",
        f'#!/usr/bin/env bash\necho "evejax $*" >>{shlex.quote(str(calls))}\n',
    )

    def run(*args, script="launch/local.sh", **env):
        if calls.exists():
            calls.unlink()
        proc = subprocess.run(
            ["bash", str(root / script), *args], capture_output=True, text=True, timeout=60,
            env={**os.environ, **env}, cwd=tmp_path,
        )
        made = calls.read_text().splitlines() if calls.exists() else []
        return proc, made

    return root, run


def test_local_setup_installs_once_then_again_when_setup_cfg_changes(fake_repo):
    root, run = fake_repo
    proc, made = run("setup")
    assert proc.returncode == 0, proc.stderr
    assert made == [
        f"python -m pip install --quiet --upgrade pip (cwd={root})",
        f"python -m pip install -e . (cwd={root})",
    ]
    proc, made = run("setup")
    assert proc.returncode == 0 and made == []

    with open(root / "setup.cfg", "a") as f:
        f.write("version = 0.2\n")
    _, made = run("setup")
    assert made[-1] == f"python -m pip install -e . (cwd={root})"


def test_local_test_installs_test_extras_with_pinned_torch_and_passes_args(fake_repo):
    root, run = fake_repo
    proc, made = run("test", "-k", "launch and not slow")
    assert proc.returncode == 0, proc.stderr
    assert made[1:] == [
        f"python -m pip install -e .[torch,test,tpu] torch==2.13.0 (cwd={root})",
        f"python -m pytest -q -n auto --dist loadfile tests -k launch and not slow (cwd={root})",
    ]
    _, made = run("test")
    assert made == [f"python -m pytest -q -n auto --dist loadfile tests (cwd={root})"]


def test_local_demo_and_other_subcommands(fake_repo):
    root, run = fake_repo
    _, made = run("demo", "--steps", "3")
    assert made[1:] == [f"python -m pip install -e .[torch] torch==2.13.0 (cwd={root})", "evejax demo --steps 3"]
    _, made = run("train", "--config", "configs/eve.py:tiny", EVEJAX_EXTRAS="tpu")
    assert made[1:] == [f"python -m pip install -e .[tpu] (cwd={root})", "evejax train --config configs/eve.py:tiny"]
    _, made = run("train", EVEJAX_EXTRAS="tpu")
    assert made == ["evejax train"]


def test_local_writes_pidfile(fake_repo, tmp_path):
    _, run = fake_repo
    pidfile = tmp_path / "run.pid"
    proc, _ = run("plan", EVEJAX_PIDFILE=str(pidfile))
    assert proc.returncode == 0, proc.stderr
    assert pidfile.read_text().strip().isdigit()


def test_local_without_arguments_prints_usage_and_fails(fake_repo):
    _, run = fake_repo
    proc, made = run()
    assert proc.returncode == 2 and "local.sh test" in proc.stderr and made == []


@pytest.mark.parametrize("pytest_rc", [0, 1, 5])
def test_ci_run_fails_whenever_pytest_fails(fake_repo, pytest_rc):
    root, run = fake_repo
    proc, made = run(script=".ci/run", FAKE_PYTEST_RC=str(pytest_rc))
    assert made[-1] == f"python -m pytest -q -n auto --dist loadfile tests (cwd={root})"
    assert proc.returncode == pytest_rc

"""The cluster launchers: the commands of a dry run, parsed back into argv, run the job on every worker with its
config, workdir, overrides and environment (overrides survive the remote shell); the rendered scripts run; bad
arguments are clear errors."""

import importlib.util
import os
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


def load(name):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", os.path.join(ROOT, "launch", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tpu_pod = load("tpu_pod")
slurm = load("slurm")


def option(argv, name):
    """The value of `name VALUE` or `name=VALUE` in argv; None when the option is absent."""
    for i, word in enumerate(argv):
        if word == name:
            return argv[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def shell_words(line):
    """The words and operators of a shell line, one level of quoting removed (`;`, `&`, `>` are words)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def between(words, first, last):
    """The words after the first `first` and before the next `last`."""
    i = words.index(first) + 1
    return words[i : words.index(last, i)]


def assert_ssh_to_all_workers(argv, tpu, zone):
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu]
    assert option(argv, "--zone") == zone and option(argv, "--worker") == "all"


def assert_starts_job(remote, job, env):
    """`remote` (a worker's shell line) enters the repository, exports `env` (with MEMAGENT_DISTRIBUTED=1, which
    makes every entry point join the run) and starts `job` detached, its output in a per-worker log."""
    words = shell_words(remote)
    assert between(words, "cd", ";") == ["memagent-jax"]
    assert between(words, "export", ";") == ["MEMAGENT_DISTRIBUTED=1", *env]
    assert between(words, "nohup", ">") == job
    assert words[words.index("nohup") - 1] == "setsid"
    after = words[words.index("nohup") :]
    assert after[after.index(">") + 1] == "$LOGS/worker-$WORKER.log" and "&" in after


def run_main(module, argv, capsys):
    code = module.main(argv)
    return code, capsys.readouterr().out


# ------------------------------------------------------------------------------------------ TPU pod


def test_tpu_start_dry_run(capsys):
    code, out = run_main(
        tpu_pod,
        [
            "--tpu",
            "pod1",
            "--zone",
            "us-east5-a",
            "--config",
            "configs/qwen2_5_7b_hotpotqa.py:v5p-128",
            "--workdir",
            "gs://b/runs/q7b",
            "--config.model.path=/mnt/ckpt",
            "--config.rl.kl_coef=0.0",
            "--dry_run",
        ],
        capsys,
    )
    assert code == 0
    (argv,) = [shlex.split(line) for line in out.splitlines()]  # one command: start the job on every worker
    assert_ssh_to_all_workers(argv, "pod1", "us-east5-a")
    assert option(argv, "--project") is None and "--internal-ip" not in argv
    assert_starts_job(
        option(argv, "--command"),
        [
            ".venv/bin/python",
            "-m",
            "memagent_jax.train",
            "--config=configs/qwen2_5_7b_hotpotqa.py:v5p-128",
            "--workdir=gs://b/runs/q7b",
            "--config.model.path=/mnt/ckpt",
            "--config.rl.kl_coef=0.0",
        ],
        env=[],
    )


def test_tpu_start_with_project_setup_env_and_quoted_override(capsys):
    code, out = run_main(
        tpu_pod,
        [
            "--tpu",
            "pod1",
            "--zone",
            "z1",
            "--project",
            "proj",
            "--internal_ip",
            "--setup",
            "git -C memagent-jax pull",
            "--env",
            "XLA_FLAGS=--a=1 --b",
            "--config",
            "c.py:x",
            "--workdir",
            "w",
            "--config.model.path=/my ckpt/it's",
            "--dry_run",
        ],
        capsys,
    )
    assert code == 0
    setup, start = [shlex.split(line) for line in out.splitlines()]  # the setup first, on every worker
    for argv in (setup, start):
        assert_ssh_to_all_workers(argv, "pod1", "z1")
        assert option(argv, "--project") == "proj" and "--internal-ip" in argv
    assert option(setup, "--command") == "git -C memagent-jax pull"
    # the override and the environment value reach the job as one word each, through the remote shell too
    assert_starts_job(
        option(start, "--command"),
        [
            ".venv/bin/python",
            "-m",
            "memagent_jax.train",
            "--config=c.py:x",
            "--workdir=w",
            "--config.model.path=/my ckpt/it's",
        ],
        env=["XLA_FLAGS=--a=1 --b"],
    )


@pytest.mark.skipif(shutil.which("setsid") is None or shutil.which("bash") is None, reason="needs bash and setsid")
def test_tpu_remote_command_runs_and_stops(tmp_path):
    """The start line, run by bash in a stand-in home directory, starts the job with the override intact and
    its environment; the teardown line stops it."""
    repo = tmp_path / "memagent-jax"
    (repo / ".venv" / "bin").mkdir(parents=True)
    fake = repo / ".venv" / "bin" / "python"
    fake.write_text(
        '#!/bin/bash\nfor a in "$@"; do echo "arg:$a"; done\necho "env:$MEMAGENT_DISTRIBUTED:$XLA_FLAGS"\n'
        "exec sleep 60\n"
    )
    fake.chmod(0o755)
    override = "--config.model.path=/my ckpt/it's $HOME `x`"
    args, overrides = tpu_pod.parse_args(
        ["--tpu", "t", "--zone", "z", "--config", "c.py:x", "--workdir", "w", override, "--env", "XLA_FLAGS=--a=1 --b"]
    )
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    subprocess.run(
        ["bash", "-c", tpu_pod.start_command(args, overrides)],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        timeout=30,
    )
    logs = list((repo / "logs" / "tpu_pod").glob("worker-*.log"))
    pids = list((repo / "logs" / "tpu_pod").glob("worker-*.pid"))
    assert len(logs) == 1 and len(pids) == 1
    try:
        for _ in range(100):
            if "env:" in logs[0].read_text():
                break
            subprocess.run(["sleep", "0.05"])
        text = logs[0].read_text().splitlines()
        assert text == [
            "arg:-m",
            "arg:memagent_jax.train",
            "arg:--config=c.py:x",
            "arg:--workdir=w",
            f"arg:{override}",
            "env:1:--a=1 --b",
        ]
    finally:
        stop, _ = tpu_pod.parse_args(["--tpu", "t", "--zone", "z", "--teardown", "--grace_s", "0"])
        result = subprocess.run(
            ["bash", "-c", tpu_pod.teardown_command(stop)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.stdout.strip() == "stopped"
    assert not list((repo / "logs" / "tpu_pod").glob("worker-*.pid"))


def test_tpu_teardown_delete_and_collect_dry_runs(capsys):
    code, out = run_main(
        tpu_pod,
        ["--tpu", "pod1", "--zone", "z1", "--teardown", "--delete", "--yes", "--grace_s", "5", "--dry_run"],
        capsys,
    )
    assert code == 0
    stop, delete = [shlex.split(line) for line in out.splitlines()]  # stop the job first, then delete the VM
    assert_ssh_to_all_workers(stop, "pod1", "z1")
    words = shell_words(option(stop, "--command"))
    # SIGTERM to the recorded process groups, the grace period, then SIGKILL
    term, grace, kill = words.index("-TERM"), words.index("sleep"), words.index("-KILL")
    assert term < grace < kill and words[grace + 1] == "5"
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod1"]
    assert option(delete, "--zone") == "z1" and "--quiet" in delete
    code, out = run_main(
        tpu_pod,
        [
            "--tpu",
            "pod1",
            "--zone",
            "z1",
            "--collect_logs",
            "out/logs",
            "--num_workers",
            "2",
            "--remote_dir",
            "/opt/repo",
            "--dry_run",
        ],
        capsys,
    )
    assert code == 0
    copies = [shlex.split(line) for line in out.splitlines()]
    assert [option(argv, "--worker") for argv in copies] == ["0", "1"]  # one copy per worker
    for argv in copies:
        assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and option(argv, "--zone") == "z1"
        assert argv[5:7] == ["pod1:/opt/repo/logs/tpu_pod/worker-*.log", "out/logs/"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--config", "c.py", "--dry_run"], "starting a job needs --workdir"),
        (["--dry_run"], "starting a job needs --config and --workdir"),
        (["--delete", "--dry_run"], "refusing to delete TPU VM 'pod1' without --yes"),
        (["--collect_logs", "d", "--dry_run"], "--collect_logs needs --num_workers"),
        (["--collect_logs", "d", "--num_workers", "0"], "--num_workers must be >= 1"),
        (
            ["--collect_logs", "d", "--num_workers", "2", "--teardown"],
            "--collect_logs cannot be combined with --teardown",
        ),
        (["--teardown", "--config.x=1"], "only apply when starting a job"),
        (
            ["--config", "c", "--workdir", "w", "--config.rl.lr", "1e-6"],
            "needs a value: write it as --config.a.b=value",
        ),
        (["--config", "c", "--workdir", "w", "--steps=3"], "unrecognized argument '--steps=3'"),
        (["--config", "c", "--workdir", "w", "--env", "1BAD=x"], "--env '1BAD=x': expected KEY=VALUE"),
        (["--config", "c", "--workdir", "w", "--env", "NOVALUE"], "expected KEY=VALUE"),
    ],
)
def test_tpu_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        tpu_pod.main(["--tpu", "pod1", "--zone", "z1"] + argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_tpu_requires_name_and_zone(capsys):
    with pytest.raises(SystemExit):
        tpu_pod.main(["--zone", "z", "--teardown"])
    assert "--tpu" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ SLURM


def sbatch_options(script):
    """The script's `#SBATCH` options: {'--nodes': '4', '--exclusive': None, ...}."""
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            (word,) = shlex.split(line[len("#SBATCH ") :])
            key, sep, value = word.partition("=")
            out[key] = value if sep else None
    return out


def exports(script):
    """The variables the script exports, their values unquoted."""
    pairs = [shlex.split(line)[1].partition("=") for line in script.splitlines() if line.startswith("export ")]
    return {key: value for key, _, value in pairs}


def srun_argv(script):
    """The srun command line (continuation lines joined), as argv."""
    (line,) = [line for line in script.replace("\\\n", " ").splitlines() if line.startswith("srun ")]
    return shlex.split(line)


def test_slurm_dry_run(capsys):
    code, out = run_main(
        slurm,
        [
            "--nodes",
            "4",
            "--job_name",
            "q7b",
            "--partition",
            "gpu",
            "--account",
            "lab",
            "--time",
            "48:00:00",
            "--repo_dir",
            "/shared/memagent-jax",
            "--sbatch_arg=--qos=high",
            "--env",
            "NCCL_DEBUG=WARN",
            "--env",
            "EXTRA=two words",
            "--config",
            "configs/qwen2_5_7b_hotpotqa.py:32xh100",
            "--workdir",
            "/shared/runs/q7b",
            "--config.model.path=/shared/my ckpt",
            "--config.rl.kl_coef=0.0",
            "--dry_run",
        ],
        capsys,
    )
    assert code == 0
    lines = out.splitlines()
    path = "/shared/memagent-jax/logs/slurm/q7b.sbatch"
    assert lines[0] == f"# {path}" and shlex.split(lines[-1]) == ["sbatch", path]  # the script, then its submission
    script = "\n".join(lines[1:-1]) + "\n"
    assert script.startswith("#!/bin/bash\n")
    sb = sbatch_options(script)
    # one task per node, each with all 8 GPUs of its node
    assert (sb["--nodes"], sb["--ntasks-per-node"], sb["--gpus-per-node"]) == ("4", "1", "8")
    assert (sb["--job-name"], sb["--partition"], sb["--account"], sb["--time"]) == ("q7b", "gpu", "lab", "48:00:00")
    assert sb["--chdir"] == "/shared/memagent-jax" and "--exclusive" in sb and sb["--qos"] == "high"
    assert exports(script) == {
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.92",
        "MEMAGENT_LOCAL_DEVICE_IDS": "0,1,2,3,4,5,6,7",
        "NCCL_DEBUG": "WARN",
        "EXTRA": "two words",
    }
    argv = srun_argv(script)
    program = argv.index(".venv/bin/python")
    srun = argv[:program]
    assert option(srun, "--nodes") == "4" and option(srun, "--ntasks-per-node") == "1"
    assert option(srun, "--kill-on-bad-exit") == "1"  # one process failing ends the job
    assert argv[program:] == [
        ".venv/bin/python",
        "-m",
        "memagent_jax.train",
        "--config=configs/qwen2_5_7b_hotpotqa.py:32xh100",
        "--workdir=/shared/runs/q7b",
        "--config.model.path=/shared/my ckpt",
        "--config.rl.kl_coef=0.0",
    ]


def test_slurm_script_is_valid_bash_and_quotes_overrides(tmp_path):
    args, overrides = slurm.parse_args(
        [
            "--nodes",
            "1",
            "--repo_dir",
            str(tmp_path),
            "--config",
            "c.py",
            "--workdir",
            "w",
            "--config.model.path=/x y/it's $HOME",
            "--no_exclusive",
            "--cpus_per_task",
            "32",
            "--mem",
            "0",
        ]
    )
    text = slurm.render(args, overrides)
    assert "#SBATCH --exclusive" not in text and "#SBATCH --cpus-per-task=32" in text and "#SBATCH --mem=0" in text
    path = tmp_path / "s.sh"
    path.write_text(text)
    subprocess.run(["bash", "-n", str(path)], check=True)
    srun_line = text.split("srun ", 1)[1].replace("\\\n", " ")
    assert shlex.split(srun_line)[-1] == "--config.model.path=/x y/it's $HOME"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_slurm_script_runs_srun_with_the_job(tmp_path):
    """The script, run by bash with a stand-in srun, starts srun with the job's argv intact and the environment
    the processes need (the GPU ids each process drives, the memory fraction, --env values)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "srun"
    fake.write_text(
        '#!/bin/bash\nfor a in "$@"; do echo "arg:$a"; done\n'
        'echo "env:$MEMAGENT_LOCAL_DEVICE_IDS:$XLA_PYTHON_CLIENT_MEM_FRACTION:$EXTRA"\n'
    )
    fake.chmod(0o755)
    override = "--config.model.path=/x y/it's $HOME"
    args, overrides = slurm.parse_args(
        [
            "--nodes",
            "2",
            "--gpus_per_node",
            "4",
            "--repo_dir",
            str(tmp_path),
            "--config",
            "c.py",
            "--workdir",
            "w",
            override,
            "--env",
            "EXTRA=two words",
        ]
    )
    script = tmp_path / "s.sh"
    script.write_text(slurm.render(args, overrides))
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "n[1-2]",
    }
    result = subprocess.run(
        ["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, check=True, timeout=30
    )
    lines = result.stdout.splitlines()
    argv = [line[len("arg:") :] for line in lines if line.startswith("arg:")]
    program = argv.index(".venv/bin/python")
    assert option(argv[:program], "--nodes") == "2"
    assert argv[program:] == [".venv/bin/python", "-m", "memagent_jax.train", "--config=c.py", "--workdir=w", override]
    assert lines[-1] == "env:0,1,2,3:0.92:two words"
    assert (tmp_path / "logs" / "slurm").is_dir()


def test_slurm_writes_script_and_reports_missing_sbatch(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code = slurm.main(["--nodes", "2", "--repo_dir", str(tmp_path), "--config", "c.py:16xh100", "--workdir", "w"])
    assert code == 127
    assert (tmp_path / "logs" / "slurm" / "memagent.sbatch").read_text().startswith("#!/bin/bash\n")
    assert (tmp_path / "logs" / "slurm").is_dir()
    assert "sbatch is not installed" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--nodes", "2", "--config", "c.py:32xh100"], "is set up for 32 GPUs, but --nodes 2 x --gpus_per_node 8 = 16"),
        (["--nodes", "0", "--config", "c.py"], "--nodes must be >= 1"),
        (["--nodes", "1", "--gpus_per_node", "0", "--config", "c.py"], "--gpus_per_node must be >= 1"),
        (["--nodes", "1", "--config", "c.py", "--mem_fraction", "1.5"], "--mem_fraction must be a number in (0, 1]"),
        (["--nodes", "1", "--config", "c.py", "--env", "A-B=1"], "--env 'A-B=1': expected KEY=VALUE"),
        (["--nodes", "1", "--config", "c.py", "--sbatch_arg", "qos=high"], "expected one sbatch option"),
        (["--nodes", "1", "--config", "c.py", "--config.steps"], "needs a value"),
        (["--nodes", "1", "--config", "c.py", "extra"], "unrecognized argument 'extra'"),
    ],
)
def test_slurm_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        slurm.main(argv + ["--workdir", "w", "--dry_run"])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_slurm_requires_config_and_workdir(capsys):
    with pytest.raises(SystemExit):
        slurm.main(["--nodes", "1", "--dry_run"])
    err = capsys.readouterr().err
    assert "--config" in err and "--workdir" in err

"""The cluster launchers: dry runs print exactly the expected commands, overrides survive the remote shell,
bad arguments are clear errors."""

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

START = (
    "set -e; cd memagent-jax; LOGS=logs/tpu_pod; mkdir -p \"$LOGS\"; "
    "WORKER=$(curl -sf -H Metadata-Flavor:Google "
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname); "
    "export MEMAGENT_DISTRIBUTED=1{env}; "
    "setsid nohup .venv/bin/python -m memagent_jax.train {job} > \"$LOGS/worker-$WORKER.log\" 2>&1 < /dev/null & "
    "echo $! > \"$LOGS/worker-$WORKER.pid\"; "
    "echo \"worker $WORKER: pid $(cat \"$LOGS/worker-$WORKER.pid\"), log $(cd \"$LOGS\" && pwd)/worker-$WORKER.log\""
)


def run_main(module, argv, capsys):
    code = module.main(argv)
    return code, capsys.readouterr().out


# ------------------------------------------------------------------------------------------ TPU pod


def test_tpu_start_dry_run(capsys):
    code, out = run_main(tpu_pod, ["--tpu", "pod1", "--zone", "us-east5-a", "--config",
                                   "configs/qwen2_5_7b_hotpotqa.py:v5p-128", "--workdir", "gs://b/runs/q7b",
                                   "--config.model.path=/mnt/ckpt", "--config.rl.kl_coef=0.0", "--dry_run"], capsys)
    assert code == 0
    job = ("--config=configs/qwen2_5_7b_hotpotqa.py:v5p-128 --workdir=gs://b/runs/q7b --config.model.path=/mnt/ckpt "
           "--config.rl.kl_coef=0.0")
    remote = START.format(env="", job=job)
    assert out == ("gcloud compute tpus tpu-vm ssh pod1 --zone us-east5-a --worker=all --command "
                   + shlex.quote(remote) + "\n")


def test_tpu_start_with_project_setup_env_and_quoted_override(capsys):
    code, out = run_main(tpu_pod, ["--tpu", "pod1", "--zone", "z1", "--project", "proj", "--internal_ip",
                                   "--setup", "git -C memagent-jax pull", "--env", "XLA_FLAGS=--a=1 --b",
                                   "--config", "c.py:x", "--workdir", "w", "--config.model.path=/my ckpt/it's",
                                   "--dry_run"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == ("gcloud compute tpus tpu-vm ssh pod1 --zone z1 --project proj --internal-ip --worker=all "
                        "--command 'git -C memagent-jax pull'")
    job = "--config=c.py:x --workdir=w '--config.model.path=/my ckpt/it'\"'\"'s'"
    remote = START.format(env=" XLA_FLAGS='--a=1 --b'", job=job)
    assert lines[1] == ("gcloud compute tpus tpu-vm ssh pod1 --zone z1 --project proj --internal-ip --worker=all "
                        "--command " + shlex.quote(remote))
    assert len(lines) == 2
    # one level of shell (the local one) gives gcloud the remote line unchanged
    assert shlex.split(lines[1])[-1] == remote


@pytest.mark.skipif(shutil.which("setsid") is None or shutil.which("bash") is None, reason="needs bash and setsid")
def test_tpu_remote_command_runs_and_stops(tmp_path):
    """The start line, run by bash in a stand-in home directory, starts the job with the override intact and
    its environment; the teardown line stops it."""
    repo = tmp_path / "memagent-jax"
    (repo / ".venv" / "bin").mkdir(parents=True)
    fake = repo / ".venv" / "bin" / "python"
    fake.write_text('#!/bin/bash\nfor a in "$@"; do echo "arg:$a"; done\necho "env:$MEMAGENT_DISTRIBUTED:$XLA_FLAGS"\n'
                    'exec sleep 60\n')
    fake.chmod(0o755)
    override = "--config.model.path=/my ckpt/it's $HOME `x`"
    args, overrides = tpu_pod.parse_args(["--tpu", "t", "--zone", "z", "--config", "c.py:x", "--workdir", "w",
                                          override, "--env", "XLA_FLAGS=--a=1 --b"])
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    subprocess.run(["bash", "-c", tpu_pod.start_command(args, overrides)], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=30)
    logs = list((repo / "logs" / "tpu_pod").glob("worker-*.log"))
    pids = list((repo / "logs" / "tpu_pod").glob("worker-*.pid"))
    assert len(logs) == 1 and len(pids) == 1
    try:
        for _ in range(100):
            if "env:" in logs[0].read_text():
                break
            subprocess.run(["sleep", "0.05"])
        text = logs[0].read_text().splitlines()
        assert text == ["arg:-m", "arg:memagent_jax.train", "arg:--config=c.py:x", "arg:--workdir=w", f"arg:{override}",
                        "env:1:--a=1 --b"]
    finally:
        stop, _ = tpu_pod.parse_args(["--tpu", "t", "--zone", "z", "--teardown", "--grace_s", "0"])
        result = subprocess.run(["bash", "-c", tpu_pod.teardown_command(stop)], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == "stopped"
    assert not list((repo / "logs" / "tpu_pod").glob("worker-*.pid"))


def test_tpu_teardown_delete_and_collect_dry_runs(capsys):
    code, out = run_main(tpu_pod, ["--tpu", "pod1", "--zone", "z1", "--teardown", "--delete", "--yes", "--grace_s", "5",
                                   "--dry_run"], capsys)
    assert code == 0
    stop = ("cd memagent-jax || exit 0; LOGS=logs/tpu_pod; for f in \"$LOGS\"/worker-*.pid; do [ -f \"$f\" ] && "
            "kill -TERM -- -\"$(cat \"$f\")\" 2>/dev/null; done; sleep 5; for f in \"$LOGS\"/worker-*.pid; do "
            "[ -f \"$f\" ] || continue; kill -KILL -- -\"$(cat \"$f\")\" 2>/dev/null; rm -f \"$f\"; done; echo stopped")
    assert out.splitlines() == [
        "gcloud compute tpus tpu-vm ssh pod1 --zone z1 --worker=all --command " + shlex.quote(stop),
        "gcloud compute tpus tpu-vm delete pod1 --zone z1 --quiet",
    ]
    code, out = run_main(tpu_pod, ["--tpu", "pod1", "--zone", "z1", "--collect_logs", "out/logs", "--num_workers", "2",
                                   "--remote_dir", "/opt/repo", "--dry_run"], capsys)
    assert code == 0
    assert out.splitlines() == [
        "gcloud compute tpus tpu-vm scp 'pod1:/opt/repo/logs/tpu_pod/worker-*.log' out/logs/ --zone z1 --worker=0",
        "gcloud compute tpus tpu-vm scp 'pod1:/opt/repo/logs/tpu_pod/worker-*.log' out/logs/ --zone z1 --worker=1",
    ]


@pytest.mark.parametrize("argv,message", [
    (["--config", "c.py", "--dry_run"], "starting a job needs --workdir"),
    (["--dry_run"], "starting a job needs --config and --workdir"),
    (["--delete", "--dry_run"], "refusing to delete TPU VM 'pod1' without --yes"),
    (["--collect_logs", "d", "--dry_run"], "--collect_logs needs --num_workers"),
    (["--collect_logs", "d", "--num_workers", "0"], "--num_workers must be >= 1"),
    (["--collect_logs", "d", "--num_workers", "2", "--teardown"], "--collect_logs cannot be combined with --teardown"),
    (["--teardown", "--config.x=1"], "only apply when starting a job"),
    (["--config", "c", "--workdir", "w", "--config.rl.lr", "1e-6"], "needs a value: write it as --config.a.b=value"),
    (["--config", "c", "--workdir", "w", "--steps=3"], "unrecognized argument '--steps=3'"),
    (["--config", "c", "--workdir", "w", "--env", "1BAD=x"], "--env '1BAD=x': expected KEY=VALUE"),
    (["--config", "c", "--workdir", "w", "--env", "NOVALUE"], "expected KEY=VALUE"),
])
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

SCRIPT = """#!/bin/bash
#SBATCH --job-name=q7b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --partition=gpu
#SBATCH --account=lab
#SBATCH --time=48:00:00
#SBATCH --chdir=/shared/memagent-jax
#SBATCH --output=logs/slurm/q7b-%j.out
#SBATCH --qos=high
# Rendered by launch/slurm.py: one JAX process per node, each driving every GPU of its node;
# jax.distributed.initialize() takes the coordinator and process ids from SLURM.
set -euo pipefail
cd /shared/memagent-jax
mkdir -p logs/slurm
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
export MEMAGENT_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7
export NCCL_DEBUG=WARN
export EXTRA='two words'
echo "job $SLURM_JOB_ID: $SLURM_JOB_NUM_NODES nodes ($SLURM_JOB_NODELIST)"
srun --nodes 4 --ntasks-per-node=1 --kill-on-bad-exit=1 --output=logs/slurm/q7b-%j-node%n.log \\
    .venv/bin/python -m memagent_jax.train --config=configs/qwen2_5_7b_hotpotqa.py:32xh100 \
--workdir=/shared/runs/q7b '--config.model.path=/shared/my ckpt' --config.rl.kl_coef=0.0
"""


def test_slurm_dry_run(capsys):
    code, out = run_main(slurm, [
        "--nodes", "4", "--job_name", "q7b", "--partition", "gpu", "--account", "lab", "--time", "48:00:00",
        "--repo_dir", "/shared/memagent-jax", "--sbatch_arg=--qos=high", "--env", "NCCL_DEBUG=WARN",
        "--env", "EXTRA=two words", "--config", "configs/qwen2_5_7b_hotpotqa.py:32xh100",
        "--workdir", "/shared/runs/q7b", "--config.model.path=/shared/my ckpt", "--config.rl.kl_coef=0.0",
        "--dry_run"], capsys)
    assert code == 0
    assert out == ("# /shared/memagent-jax/logs/slurm/q7b.sbatch\n" + SCRIPT
                   + "sbatch /shared/memagent-jax/logs/slurm/q7b.sbatch\n")


def test_slurm_script_is_valid_bash_and_quotes_overrides(tmp_path):
    args, overrides = slurm.parse_args(["--nodes", "1", "--repo_dir", str(tmp_path), "--config", "c.py",
                                        "--workdir", "w", "--config.model.path=/x y/it's $HOME", "--no_exclusive",
                                        "--cpus_per_task", "32", "--mem", "0"])
    text = slurm.render(args, overrides)
    assert "#SBATCH --exclusive" not in text and "#SBATCH --cpus-per-task=32" in text and "#SBATCH --mem=0" in text
    path = tmp_path / "s.sh"
    path.write_text(text)
    subprocess.run(["bash", "-n", str(path)], check=True)
    srun_line = text.split("srun ", 1)[1].replace("\\\n", " ")
    assert shlex.split(srun_line)[-1] == "--config.model.path=/x y/it's $HOME"


def test_slurm_writes_script_and_reports_missing_sbatch(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code = slurm.main(["--nodes", "2", "--repo_dir", str(tmp_path), "--config", "c.py:16xh100", "--workdir", "w"])
    assert code == 127
    assert (tmp_path / "logs" / "slurm" / "memagent.sbatch").read_text().startswith("#!/bin/bash\n")
    assert (tmp_path / "logs" / "slurm").is_dir()
    assert "sbatch is not installed" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--nodes", "2", "--config", "c.py:32xh100"], "is set up for 32 GPUs, but --nodes 2 x --gpus_per_node 8 = 16"),
    (["--nodes", "0", "--config", "c.py"], "--nodes must be >= 1"),
    (["--nodes", "1", "--gpus_per_node", "0", "--config", "c.py"], "--gpus_per_node must be >= 1"),
    (["--nodes", "1", "--config", "c.py", "--mem_fraction", "1.5"], "--mem_fraction must be a number in (0, 1]"),
    (["--nodes", "1", "--config", "c.py", "--env", "A-B=1"], "--env 'A-B=1': expected KEY=VALUE"),
    (["--nodes", "1", "--config", "c.py", "--sbatch_arg", "qos=high"], "expected one sbatch option"),
    (["--nodes", "1", "--config", "c.py", "--config.steps"], "needs a value"),
    (["--nodes", "1", "--config", "c.py", "extra"], "unrecognized argument 'extra'"),
])
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

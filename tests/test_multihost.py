"""Multi-host training and its tools.

- The train entry point as 2 processes x 4 CPU devices (gloo on a 127.0.0.1 coordinator, started by
  launch/local.py) gives the same per-step metrics and final params as 1 process x 8 devices, and a 2-process
  run resumes from a checkpoint a 2-process run wrote.
- launch/local.py: the dry run prints exactly the commands and environment; a failing process stops the others.
- memagent_jax.distributed: a single-process run does nothing; partial settings are named errors.
- Separate rollout / learner meshes (config.mesh.rollout_devices) equal the colocated run.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from hf_tiny import agent_flags_for_tests, grpo_cpu_config, make_agent_model_dir
from memagent_jax import distributed
from memagent_jax.models import load_hf_params
from memagent_jax.rl.recipe import TrainConfigError, split_devices, validate_config

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launch" / "local.py"
# Metrics that are timings (differ run to run); everything else must agree.
TIMING = ("time", "tokens_per_s")


def _load_launcher():
    spec = importlib.util.spec_from_file_location("launch_local", LAUNCHER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _grpo_config(model_dir, **overrides):
    return grpo_cpu_config(model_dir, **overrides)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_agent_model_dir(tmp_path_factory.mktemp("multihost") / "model", seed=2)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {m["step"]: m for m in map(json.loads, f)}


def _assert_same_metrics(a: dict, b: dict, steps):
    assert sorted(a) == sorted(b) == list(steps)
    for step in steps:
        keys = {k for k in a[step] if not k.endswith("_s") and k not in TIMING}
        assert keys == {k for k in b[step] if not k.endswith("_s") and k not in TIMING}, step
        for k in sorted(keys):
            assert a[step][k] == pytest.approx(b[step][k], rel=1e-4, abs=1e-6), (step, k, a[step][k], b[step][k])


def _assert_same_params(dir_a, dir_b, initial_dir):
    a, _ = load_hf_params(os.path.join(dir_a, "export"))
    b, _ = load_hf_params(os.path.join(dir_b, "export"))
    initial, _ = load_hf_params(initial_dir)
    moved = jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), a, initial)
    assert max(jax.tree.leaves(moved)) > 1e-4  # training changed the params
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5), a, b)


# ------------------------------------------------------------------------------ 2 processes == 1 process

# Data-parallel mesh (params replicated): the rollout needs no cross-process all-gathers, which keeps the
# 2-process run quick over gloo. The entropy bonus gives every step a real gradient (the tiny random model
# never earns a reward, so advantages are 0).
TRAIN_FLAGS = [
    *agent_flags_for_tests(),
    "--config.mesh.data=-1",
    "--config.mesh.fsdp=1",
    "--config.rl.learning_rate=1e-3",
    "--config.rl.entropy_coef=0.01",
    "--config.checkpoint.every=1",
]


def _launch(num_processes, devices_per_process, workdir, model_dir, steps, log_dir, cache_dir, *extra):
    cmd = [
        sys.executable,
        str(LAUNCHER),
        "--num_processes",
        str(num_processes),
        "--devices_per_process",
        str(devices_per_process),
        "--log_dir",
        str(log_dir),
        "--",
        sys.executable,
        "-m",
        "memagent_jax.train",
        "--config",
        f"{REPO / 'configs' / 'grpo.py'}:cpu",
        "--workdir",
        str(workdir),
        f"--config.model.path={model_dir}",
        f"--config.steps={steps}",
        *TRAIN_FLAGS,
        *extra,
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    # A restarted run reuses the compiled programs of the first one (JAX's persistent compilation cache).
    env.update(
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=900):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-6000:]
    return out


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    """Four launches of the train entry point, two at a time (2 steps each unless said):
    one:      1 process x 8 devices (colocated rollout and learner)
    two:      2 processes x 4 devices, stopped after step 1, then restarted (resumes from its checkpoint)
    separate: 1 process x 8 devices, learner on 4 devices and rollout on the other 4 (config.mesh.rollout_devices)
    """
    root = tmp_path_factory.mktemp("runs")
    cache = root / "jax_cache"
    t0 = time.perf_counter()
    launched = []
    try:
        launched += [
            _launch(1, 8, root / "one", model_dir, 2, root / "logs_one", cache),
            _launch(2, 4, root / "two", model_dir, 1, root / "logs_two_a", cache),
        ]
        outputs = {"one": _finish(launched[0]), "two_a": _finish(launched[1])}
        launched += [
            _launch(2, 4, root / "two", model_dir, 2, root / "logs_two_b", cache),
            _launch(
                1, 8, root / "separate", model_dir, 2, root / "logs_separate", cache, "--config.mesh.rollout_devices=4"
            ),
        ]
        outputs.update(two_b=_finish(launched[2]), separate=_finish(launched[3]))
    finally:
        for proc in launched:  # a failed launch: stop the others (the launcher stops its processes on SIGTERM)
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
    print(f"4 launches in {time.perf_counter() - t0:.0f}s")
    return root, outputs


@pytest.mark.slow
def test_two_processes_equal_one_process_and_resume(runs, model_dir):
    root, out = runs
    assert "resumed from" in out["two_b"] and "at step 1" in out["two_b"]
    assert "[p0] step 1/1" in out["two_a"] and "[p1] step" not in out["two_a"]  # only process 0 reports
    for name in ("process_0.log", "process_1.log"):
        assert (root / "logs_two_a" / name).stat().st_size > 0
    assert sorted(os.listdir(root / "two" / "checkpoints")) == ["1", "2"]
    _assert_same_metrics(_metrics(root / "one"), _metrics(root / "two"), [1, 2])
    _assert_same_params(root / "one", root / "two", model_dir)


@pytest.mark.slow
def test_separate_rollout_mesh_equals_colocated(runs, model_dir):
    root, _ = runs
    _assert_same_metrics(_metrics(root / "one"), _metrics(root / "separate"), [1, 2])
    _assert_same_params(root / "one", root / "separate", model_dir)


# ------------------------------------------------------------------------------------------ launcher


def test_launcher_dry_run_prints_the_exact_commands(capsys):
    launcher = _load_launcher()
    rc = launcher.main(
        [
            "--num_processes",
            "2",
            "--devices_per_process",
            "4",
            "--port",
            "12345",
            "--dry_run",
            "--",
            "python",
            "-m",
            "memagent_jax.train",
            "--workdir",
            "/tmp/a b",
        ]
    )
    assert rc == 0
    assert capsys.readouterr().out.splitlines() == [
        "[p0] MEMAGENT_COORDINATOR=127.0.0.1:12345 MEMAGENT_NUM_PROCESSES=2 MEMAGENT_PROCESS_ID=0 JAX_PLATFORMS=cpu "
        "JAX_NUM_CPU_DEVICES=4 python -m memagent_jax.train --workdir '/tmp/a b'",
        "[p1] MEMAGENT_COORDINATOR=127.0.0.1:12345 MEMAGENT_NUM_PROCESSES=2 MEMAGENT_PROCESS_ID=1 JAX_PLATFORMS=cpu "
        "JAX_NUM_CPU_DEVICES=4 python -m memagent_jax.train --workdir '/tmp/a b'",
    ]
    rc = launcher.main(
        [
            "--num_processes",
            "2",
            "--devices_per_process",
            "2",
            "--port",
            "9",
            "--platform",
            "gpu",
            "--pass_flags",
            "--dry_run",
            "--",
            "train",
        ]
    )
    assert rc == 0
    assert capsys.readouterr().out.splitlines() == [
        "[p0] MEMAGENT_COORDINATOR=127.0.0.1:9 MEMAGENT_NUM_PROCESSES=2 MEMAGENT_PROCESS_ID=0 CUDA_VISIBLE_DEVICES=0,1 "
        "train --coordinator_address=127.0.0.1:9 --num_processes=2 --process_id=0",
        "[p1] MEMAGENT_COORDINATOR=127.0.0.1:9 MEMAGENT_NUM_PROCESSES=2 MEMAGENT_PROCESS_ID=1 CUDA_VISIBLE_DEVICES=2,3 "
        "train --coordinator_address=127.0.0.1:9 --num_processes=2 --process_id=1",
    ]
    with pytest.raises(SystemExit):
        launcher.main(["--num_processes", "2", "--dry_run"])  # no command after --


def test_launcher_stops_the_others_when_one_fails(tmp_path):
    script = (
        "import os, sys, time\n"
        "print('hello from', os.environ['MEMAGENT_PROCESS_ID'], os.environ['JAX_NUM_CPU_DEVICES'], flush=True)\n"
        "if os.environ['MEMAGENT_PROCESS_ID'] == '1':\n"
        "    sys.exit(3)\n"
        "time.sleep(120)\n"
    )
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            str(LAUNCHER),
            "--num_processes",
            "2",
            "--devices_per_process",
            "3",
            "--log_dir",
            str(tmp_path / "logs"),
            "--grace_s",
            "5",
            "--",
            sys.executable,
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert time.perf_counter() - t0 < 30  # process 0 was stopped, not waited for
    assert "[p0] hello from 0 3" in proc.stdout and "[p1] hello from 1 3" in proc.stdout
    assert "process 1 exited with status 3" in proc.stderr
    assert (tmp_path / "logs" / "process_1.log").read_text() == "hello from 1 3\n"


# --------------------------------------------------------------------------------------- distributed


@pytest.fixture
def fresh_distributed(monkeypatch):
    monkeypatch.setattr(distributed, "_STATE", {"initialized": False, "multi_process": False})
    for name in (
        distributed.ENV_COORDINATOR,
        distributed.ENV_NUM_PROCESSES,
        distributed.ENV_PROCESS_ID,
        distributed.ENV_LOCAL_DEVICE_IDS,
        distributed.ENV_FORCE,
        "JAX_COORDINATOR_ADDRESS",
        "SLURM_JOB_ID",
        "SLURM_NTASKS",
        "OMPI_MCA_orte_hnp_uri",
        "TPU_WORKER_HOSTNAMES",
        "TPU_PROCESS_ADDRESSES",
        "MEGASCALE_COORDINATOR_ADDRESS",
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_needs_no_setup(fresh_distributed):
    assert distributed.cluster_detected() is None
    assert distributed.initialize() is False
    assert distributed.initialize() is False  # idempotent
    fresh_distributed.setattr(distributed, "_STATE", {"initialized": False, "multi_process": False})
    fresh_distributed.setenv(distributed.ENV_NUM_PROCESSES, "1")
    assert distributed.initialize() is False
    assert jax.process_count() == 1


def test_cpu_thread_pool_is_sized_for_simulated_devices(fresh_distributed):
    """XLA:CPU's collectives wait on its pool's threads: with simulated devices the pool gets 4 per device
    (PJRT_NPROC, before the backend starts; `initialize` does it), a value already set is kept, one device changes
    nothing; and this process's pool (sized by conftest for its 8 devices) really has that many threads."""
    env = distributed.ENV_CPU_THREADS
    fresh_distributed.delenv(env, raising=False)
    assert distributed.size_cpu_thread_pool(1) is None and env not in os.environ
    assert distributed.size_cpu_thread_pool(8) == 32 and os.environ[env] == "32"
    fresh_distributed.setenv(env, "5")
    assert distributed.size_cpu_thread_pool(8) is None and os.environ[env] == "5"
    fresh_distributed.delenv(env)
    assert distributed.initialize() is False and os.environ[env] == str(4 * jax.config.jax_num_cpu_devices)

    jax.block_until_ready(jax.jit(lambda x: x * 2)(np.ones(4, np.float32)))
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            names.append(Path(f"/proc/self/task/{task}/comm").read_text().strip())
        except OSError:  # a thread that ended meanwhile
            pass
    assert names.count("tf_XLAEigen") >= distributed.cpu_pool_threads(jax.local_device_count()) == 32


def test_partial_settings_are_named_errors(fresh_distributed):
    with pytest.raises(distributed.DistributedError, match="--num_processes, --process_id"):
        distributed.initialize(coordinator_address="127.0.0.1:1234")
    with pytest.raises(distributed.DistributedError, match=r"--process_id must be in \[0, 2\), got 2"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    fresh_distributed.setenv(distributed.ENV_NUM_PROCESSES, "two")
    with pytest.raises(distributed.DistributedError, match="MEMAGENT_NUM_PROCESSES='two' is not an integer"):
        distributed.initialize()


def test_cluster_detection(fresh_distributed):
    slurm = {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_NODELIST": "n1",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
    }
    for k, v in slurm.items():
        fresh_distributed.setenv(k, v)
    assert distributed.cluster_detected() is None  # one task: a single-process run
    fresh_distributed.setenv("SLURM_NTASKS", "4")
    assert distributed.cluster_detected() == "slurm"
    for k in slurm:
        fresh_distributed.delenv(k)
    fresh_distributed.setenv("TPU_WORKER_HOSTNAMES", "host-0")
    assert distributed.cluster_detected() is None  # one TPU VM
    fresh_distributed.setenv("TPU_WORKER_HOSTNAMES", "host-0,host-1")
    assert distributed.cluster_detected() == "tpu"


def test_flags_are_registered_once():
    from absl import flags

    fv = flags.FlagValues()
    distributed.define_flags(fv)
    distributed.define_flags(fv)
    fv(["prog", "--coordinator_address=10.0.0.1:9999", "--num_processes=4", "--process_id=3"])
    assert (fv.coordinator_address, fv.num_processes, fv.process_id) == ("10.0.0.1:9999", 4, 3)


# ------------------------------------------------------------------------------------ config checks


def test_multihost_config_accepts_questions_split_over_processes(model_dir):
    validate_config(_grpo_config(model_dir), device_count=8, process_count=2)  # 2 questions over 2 processes


@pytest.mark.parametrize(
    "overrides, processes, match",
    [
        pytest.param(
            {"rl.questions_per_step": 3},
            2,
            r"config\.rl\.questions_per_step=3 must be a multiple of the 2 ",
            id="questions-per-process",
        ),
        pytest.param(
            {"mesh.fsdp": 1, "mesh.tensor": -1},
            2,
            r"config\.mesh: data x fsdp = 1 must be a multiple of the 2 ",
            id="batch-axes-per-process",
        ),
        pytest.param(
            {"mesh.rollout_devices": 8},
            1,
            r"config\.mesh\.rollout_devices must be 0 .* got 8",
            id="rollout-takes-every-device",
        ),
        pytest.param(
            {"mesh.rollout_devices": 3},
            2,
            r"config\.mesh\.rollout_devices=3 must be a multiple of the 2 ",
            id="rollout-devices-per-process",
        ),
        pytest.param(
            {"mesh.rollout_devices": 4, "mesh.rollout_tensor": 3},
            1,
            r"config\.mesh\.rollout_fsdp x config\.mesh\.rollout_tensor = 1 x 3",
            id="rollout-mesh-shape",
        ),
        pytest.param(
            {"mesh.rollout_devices": 2, "mesh.fsdp": 4},
            1,
            r"does not match the 6 learner devices \(8 devices - config\.mesh\.rollout_devices=2\)",
            id="learner-mesh-shape",
        ),
    ],
)
def test_multihost_config_errors_name_the_field(model_dir, overrides, processes, match):
    with pytest.raises(TrainConfigError, match=match):
        validate_config(_grpo_config(model_dir, **overrides), device_count=8, process_count=processes)


def test_split_devices(model_dir):
    cfg = _grpo_config(model_dir, **{"mesh.rollout_devices": 3})
    learner, rollout = split_devices(cfg)
    assert learner == jax.devices()[:5] and rollout == jax.devices()[5:]
    assert split_devices(_grpo_config(model_dir)) == (jax.devices(), None)

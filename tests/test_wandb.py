"""The Weights & Biases sink of MetricsWriter and config.wandb, in W&B's offline mode (no network).

An offline run writes its records (run + config, history rows, exit) to `<dir>/wandb/offline-run-*/run-<id>.wandb`,
a LevelDB-style log of `wandb_internal_pb2.Record` protobufs (wandb ships no reader of it); `_records` reads it back
with wandb's own protobuf classes, so the tests check what `wandb sync` would upload.
"""

import glob
import importlib.util
import io
import json
import os
import struct
import subprocess
import sys
import time

import pytest
import wandb  # the wandb extra, part of the test extra

from hf_tiny import grpo_cpu_config, make_agent_model_dir
from memagent_jax.rl import recipe
from memagent_jax.rl.metrics import RUN_ID_FILE, MetricsWriter, WandbError, WandbSettings
from memagent_jax.settings import SettingError

_BLOCK = 32768  # the log's block size; each record chunk has a 7-byte header (crc32, length, type)
_FULL, _LAST = 1, 4


def _records(path):
    """The protobuf records of a `.wandb` file, in order. W&B's service process writes the file after `finish`
    returns: `wandb.teardown()` first waits for it to finish."""
    from wandb.proto import wandb_internal_pb2

    wandb.teardown()
    with open(path, "rb") as f:
        data = f.read()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), path
    pos, pending, out = 7, b"", []
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # a block's zero-padded tail
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def _items(items):
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def _offline_run(wandb_dir):
    """(run record, {step: history row}, exit code) of the one offline run under `<wandb_dir>/wandb/`."""
    files = glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(files) == 1, files
    run, history, exit_code = None, {}, None
    for record in _records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            history[record.history.step.num] = _items(record.history.item)
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return run, history, exit_code


def _wandb_children():
    """This process's wandb service processes still running."""
    out = subprocess.run(["ps", "--ppid", str(os.getpid()), "-o", "args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "wandb" in line]


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline and silent, its settings and caches in tmp_path, no API key; afterwards no wandb process left."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.setenv("NETRC", str(tmp_path / "wandb-home" / "netrc"))
    yield
    wandb.teardown()
    assert _wandb_children() == []


def _writer(workdir, wandb_dir, **settings):
    return MetricsWriter(
        workdir,
        tensorboard=False,
        process_index=0,
        stream=io.StringIO(),
        wandb=WandbSettings(**{"enabled": True, "mode": "offline", "dir": str(wandb_dir), **settings}),
        run_config={"rl.learning_rate": 1e-3, "model.path": "/models/tiny", "rl.group_size": 4},
    )


def test_offline_run_holds_every_step_and_the_config(tmp_path):
    workdir, wandb_dir = tmp_path / "run_a", tmp_path / "wb"
    rows = {step: {"reward_mean": 0.25 * step, "loss": 1.0 / step, "grad_norm": step + 0.5} for step in (1, 2, 3)}
    with _writer(workdir, wandb_dir, tags="grpo, tiny", project="memagent-tests") as writer:
        assert writer.wandb_run is not None
        for step, metrics in rows.items():
            writer.write(step, metrics)
    assert writer.wandb_run is None  # finished on close
    run, history, exit_code = _offline_run(wandb_dir)
    run_id = (workdir / RUN_ID_FILE).read_text().strip()
    assert run.run_id == run_id and run.project == "memagent-tests"
    assert run.display_name == "run_a" and list(run.tags) == ["grpo", "tiny"]
    config = _items(run.config.update)
    assert (
        config["rl.learning_rate"] == 1e-3 and config["model.path"] == "/models/tiny" and config["rl.group_size"] == 4
    )
    assert sorted(history) == [1, 2, 3]
    for step, metrics in rows.items():
        for key, value in metrics.items():
            assert history[step][key] == pytest.approx(value)
    assert exit_code == 0
    # The JSONL file is written as without W&B.
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]


def test_resumed_writer_continues_the_same_wandb_run(tmp_path):
    workdir, wandb_dir = tmp_path / "run", tmp_path / "wb"
    with _writer(workdir, wandb_dir) as first:
        first_id = first.wandb_run.id
        first.write(1, {"loss": 1.0})
        first.write(2, {"loss": 0.5})
    assert (workdir / RUN_ID_FILE).read_text().strip() == first_id
    time.sleep(1.05 - time.time() % 1)  # offline run folders are named by the second they start
    resumed = _writer(workdir, wandb_dir)
    assert resumed.wandb_run.id == first_id
    resumed.write(3, {"loss": 0.25})
    resumed.close()
    files = sorted(glob.glob(str(wandb_dir / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(files) == 2 and all(f.endswith(f"run-{first_id}.wandb") for f in files)
    steps = [[r.history.step.num for r in _records(f) if r.WhichOneof("record_type") == "history"] for f in files]
    assert steps == [[1, 2], [3]]
    # A new workdir gets a new W&B run.
    with _writer(tmp_path / "other", tmp_path / "wb_other") as other:
        assert other.wandb_run.id != first_id


def test_a_run_that_raises_is_marked_failed(tmp_path):
    with pytest.raises(RuntimeError):
        with _writer(tmp_path / "run", tmp_path / "wb") as writer:
            writer.write(1, {"loss": 1.0})
            raise RuntimeError("boom")
    assert _offline_run(tmp_path / "wb")[2] == 1
    # The trainer's form: close() in a `finally` while the error propagates.
    writer = _writer(tmp_path / "run2", tmp_path / "wb2")
    with pytest.raises(RuntimeError):
        try:
            writer.write(1, {"loss": 1.0})
            raise RuntimeError("boom")
        finally:
            writer.close()
    assert _offline_run(tmp_path / "wb2")[2] == 1


def test_default_path_and_disabled_mode_do_not_import_wandb(tmp_path):
    code = (
        "import io, sys\n"
        "from memagent_jax.configs import grpo\n"
        "from memagent_jax.rl import recipe\n"
        "from memagent_jax.rl.metrics import MetricsWriter, WandbSettings\n"
        "cfg = grpo.get_config('cpu')\n"
        "assert recipe.wandb_settings(cfg).active is False\n"
        "cfg.wandb.enabled = True\n"
        "cfg.wandb.mode = 'disabled'\n"
        "for i, settings in enumerate([None, recipe.wandb_settings(cfg)]):\n"
        f"    with MetricsWriter({str(tmp_path)!r} + str(i), process_index=0, stream=io.StringIO(), tensorboard=False,"
        " wandb=settings) as w:\n"
        "        w.write(1, {'loss': 1.0})\n"
        "        assert w.wandb_run is None\n"
        "assert 'wandb' not in sys.modules, 'wandb was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not os.path.exists(tmp_path / "0" / RUN_ID_FILE)


def test_only_process_zero_logs_to_wandb(tmp_path):
    writer = MetricsWriter(
        tmp_path / "run", process_index=1, wandb=WandbSettings(enabled=True, mode="offline", dir=str(tmp_path / "wb"))
    )
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert writer.wandb_run is None and not os.path.exists(tmp_path / "wb")


# ------------------------------------------------------------------------------------------------ faults


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_agent_model_dir(tmp_path_factory.mktemp("wandb") / "model", seed=2)


@pytest.mark.faults
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mode": "cloud"}, r"^config\.wandb\.mode must be one of \['online', 'offline', 'disabled'\], got 'cloud'$"),
        ({"project": "team/project"}, r"^config\.wandb\.project must be a W&B project name .*got 'team/project'$"),
        ({"project": ""}, r"^config\.wandb\.project must be a W&B project name"),
        ({"tags": "ok, " + "x" * 65}, r"^config\.wandb\.tags holds a tag longer than 64 characters"),
    ],
    ids=["mode", "project-with-slash", "project-empty", "tag-too-long"],
)
def test_config_errors_name_the_wandb_field(overrides, message, model_dir):
    cfg = grpo_cpu_config(model_dir, **{f"wandb.{k}": v for k, v in overrides.items()})
    with pytest.raises(recipe.TrainConfigError, match=message):
        recipe.validate_config(cfg, device_count=8)


@pytest.mark.faults
def test_wandb_settings_refuse_non_strings_and_non_booleans():
    with pytest.raises(SettingError, match=r"^enabled must be True or False, got 'yes'$"):
        WandbSettings(enabled="yes")
    with pytest.raises(SettingError, match=r"^tags must be a string, got \['a', 'b'\]$"):
        WandbSettings(tags=["a", "b"])


@pytest.mark.faults
def test_enabled_without_the_package_is_one_line_naming_the_extra(model_dir, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    cfg = grpo_cpu_config(model_dir, **{"wandb.enabled": True, "wandb.mode": "offline"})
    with pytest.raises(
        recipe.TrainConfigError,
        match=r'^config\.wandb\.enabled=True needs the wandb package.*pip install -e "\.\[wandb\]"$',
    ):
        recipe.validate_config(cfg, device_count=8)
    recipe.validate_config(cfg, device_count=8, check_files=False)  # the planner: another machine's environment
    cfg.wandb.mode = "disabled"
    recipe.validate_config(cfg, device_count=8)  # nothing to log: wandb not needed


@pytest.mark.faults
def test_online_without_a_login_is_one_line_and_leaves_nothing_open(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    workdir = tmp_path / "run"
    with pytest.raises(WandbError, match=r"^config\.wandb: W&B could not start the run: .*mode=offline") as e:
        _writer(workdir, tmp_path / "wb", mode="online")
    assert "\n" not in str(e.value)
    assert wandb.run is None


@pytest.mark.faults
def test_a_bad_run_id_file_names_the_file(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / RUN_ID_FILE).write_text("not an id!\n")
    with pytest.raises(WandbError, match=rf"^{tmp_path}/run/{RUN_ID_FILE}: 'not an id!' is not a W&B run id.*delete"):
        _writer(workdir, tmp_path / "wb")


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.slow  # a two-step training run (about 40 s on 2 CPU cores)
def test_training_run_logs_to_wandb(model_dir, tmp_path):
    from memagent_jax.rl.trainer import train

    workdir, wandb_dir = tmp_path / "train", tmp_path / "wb"
    overrides = {"rl.learning_rate": 1e-3, "wandb.enabled": True, "wandb.mode": "offline", "wandb.dir": str(wandb_dir)}
    train(grpo_cpu_config(model_dir, steps=2, **overrides), str(workdir))
    run, history, exit_code = _offline_run(wandb_dir)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(history) == [1, 2] and exit_code == 0
    for row in rows:
        for key in ("reward_mean", "loss", "conversations", "step_time_s"):
            assert history[row["step"]][key] == pytest.approx(row[key])
    config = _items(run.config.update)
    assert config["rl.learning_rate"] == 1e-3 and config["steps"] == 2 and config["wandb.mode"] == "offline"
    assert config["model.path"] == str(model_dir) and run.display_name == "train"

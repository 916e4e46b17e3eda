"""User errors, one rule for every entry point: one line naming the field, flag, file or row, exit status 2, no
traceback unless --debug (or MEMAGENT_DEBUG=1) asks for one. Config typos are named with the nearest field before
absl parses anything; batch sizes are clamped to the rows there are; train refuses a run the planner's memory
estimate says cannot fit; launcher names that could pass as gcloud / sbatch flags are refused."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from hf_tiny import SMALL_ANSWER_FLAGS, grpo_cpu_config, make_agent_model_dir
from memagent_jax import answer, cli, errors, generate, plan, settings
from memagent_jax.data import hotpotqa
from memagent_jax.data.formats import write_eval_file
from memagent_jax.data.records import QARecord

pytestmark = pytest.mark.faults

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SMALL = SMALL_ANSWER_FLAGS


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_agent_model_dir(tmp_path_factory.mktemp("faults_errors") / "model", variant="qwen2", seed=1)


def run_module(*argv, env=None):
    """`python -m <argv>` in the repository root: (exit status, stderr lines)."""
    done = subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=REPO, **(env or {})),
    )
    return done.returncode, [line for line in done.stderr.splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------- the shared rule


def test_report_user_errors_one_line_status_2_and_debug(capsys, monkeypatch):
    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as e, errors.report_user_errors():
        raise settings.ConfigError("config.rl.learning_rate must be > 0,\ngot 0")
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: config.rl.learning_rate must be > 0, got 0\n"
    with pytest.raises(ZeroDivisionError), errors.report_user_errors():  # a bug keeps its traceback
        1 / 0
    with pytest.raises(settings.ConfigError), errors.debugging(True), errors.report_user_errors():
        raise settings.ConfigError("x")
    monkeypatch.setenv(errors.DEBUG_ENV, "1")
    with pytest.raises(FileNotFoundError), errors.report_user_errors():
        raise FileNotFoundError("no such file: x.json")
    assert not errors.debugging(False).__enter__() and errors.debug_requested()


def test_user_error_classes_of_every_layer():
    from memagent_jax.agent import AgentInputError, AgentSettingsError, TemplateError
    from memagent_jax.data.records import DataFormatError
    from memagent_jax.evaluation.specs import EvalConfigError
    from memagent_jax.model_flags import FlagError
    from memagent_jax.models import CheckpointError
    from memagent_jax.models.config import ConfigError as ModelConfigError
    from memagent_jax.planning import PlanError
    from memagent_jax.rl.recipe import TrainConfigError
    from memagent_jax.storage.checkpoint import CheckpointError as StateCheckpointError

    for cls in (FlagError, AgentSettingsError, EvalConfigError, TrainConfigError):
        assert issubclass(cls, errors.UserError)
    types = errors.user_error_types()
    for cls in (AgentInputError, TemplateError, DataFormatError, CheckpointError, ModelConfigError, PlanError):
        assert issubclass(cls, types), cls
    assert errors.is_user_error(StateCheckpointError("x")) and not errors.is_user_error(ValueError("x"))


def test_take_debug_flag_leaves_the_words_after_a_double_dash():
    assert errors.take_debug_flag(["a", "--debug", "b", "--", "--debug"]) == (["a", "b", "--", "--debug"], True)
    assert errors.take_debug_flag(["a"]) == (["a"], False)


# ----------------------------------------------------------------------------------------- config typos


@pytest.mark.parametrize(
    "argv,line",
    [
        (
            ["memagent_jax.train", "--config.rl.learnig_rate=1", "--workdir", "w"],
            "error: --config.rl.learnig_rate: no such field in configs/grpo.py (did you mean rl.learning_rate?)",
        ),
        (
            ["memagent_jax.train", "--config", "configs/grpo.py:cpu", "--config.modles=x", "--workdir", "w"],
            "error: --config.modles: no such field in configs/grpo.py (did you mean model?)",
        ),
        (
            ["memagent_jax.evaluate", "--config.modles=x", "--workdir", "w"],
            "error: --config.modles: no such field in configs/evaluate.py (did you mean models?)",
        ),
        (
            ["memagent_jax.pipeline", "--config.task.nme=x", "--workdir", "w"],
            "error: --config.task.nme: no such field in configs/tiny_synthetic.py (did you mean task.name?)",
        ),
        (
            ["memagent_jax.plan", "--config", "configs/qwen3_4b_hotpotqa.py:8xh100", "--config.rl.learnig_rate=1"],
            "error: --config.rl.learnig_rate: no such field in configs/qwen3_4b_hotpotqa.py "
            "(did you mean rl.learning_rate?)",
        ),
        (
            ["memagent_jax.cli", "train", "--config.rl.learnig_rate=1", "--print-config"],
            "error: --config.rl.learnig_rate: no such field in configs/grpo.py (did you mean rl.learning_rate?)",
        ),
        (
            ["memagent_jax.cli", "demo", "--config.agent.chunk_tokns=8"],
            "error: --config.agent.chunk_tokns: no such field in configs/tiny_synthetic.py "
            "(did you mean agent.chunk_tokens?)",
        ),
        (
            ["memagent_jax.train", "--config.rl.learning_rate=abc", "--workdir", "w"],
            "error: flag --config.rl.learning_rate=abc: could not convert string to float: 'abc'",
        ),
        (
            ["memagent_jax.train", "--config", "nofile.py", "--workdir", "w"],
            "error: --config nofile.py: no such file",
        ),
        (
            ["memagent_jax.train", "--config.steps.x=1", "--workdir", "w"],
            "error: --config.steps.x: steps is a value, not a section in configs/grpo.py",
        ),
    ],
)
def test_config_typos_are_one_line_exit_2(argv, line):
    code, err = run_module(*argv)
    assert (code, err) == (2, [line])


def test_config_typo_with_debug_shows_the_traceback():
    code, err = run_module("memagent_jax.train", "--config.rl.learnig_rate=1", "--workdir", "w", "--debug")
    assert code == 1 and err[0].startswith("Traceback") and "did you mean rl.learning_rate?" in err[-1]
    code, err = run_module("memagent_jax.train", "--config.modles=1", "--workdir", "w", env={errors.DEBUG_ENV: "1"})
    assert code == 1 and err[0].startswith("Traceback")


def test_config_typo_in_process(capsys):
    assert cli.main(["train", "--config.rl.learnig_rate=1", "--workdir", "w"]) == 2
    assert capsys.readouterr().err == (
        "error: --config.rl.learnig_rate: no such field in configs/grpo.py (did you mean rl.learning_rate?)\n"
    )
    assert cli.main(["evaluate", "--config.modles=x", "--print-config"]) == 2
    assert "--config.modles: no such field in configs/evaluate.py (did you mean models?)" in capsys.readouterr().err
    assert plan.main(["plan", "--config", "configs/qwen3_4b_hotpotqa.py:8xh100", "--config.mesh.tensr=2"]) == 2
    assert "did you mean mesh.tensor?" in capsys.readouterr().err
    with pytest.raises(settings.ConfigError, match="did you mean rl.learning_rate"):
        cli.main(["train", "--config.rl.learnig_rate=1", "--workdir", "w", "--debug"])


# ----------------------------------------------------------------------------------------- --debug everywhere


def test_argparse_entry_points_take_debug(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    argv = ["--model", missing, "--question", "q?", "--document", missing]
    assert answer.main(argv) == 2
    assert capsys.readouterr().err.count("\n") == 1
    from memagent_jax.model_flags import FlagError

    with pytest.raises(FlagError, match="--model"):
        answer.main(argv + ["--debug"])
    raw = tmp_path / "raw.json"
    assert hotpotqa.main(["--input", str(raw), "--out_dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"error: --input {raw} does not exist\n"
    from memagent_jax.data.buildcli import BuildError

    with pytest.raises(BuildError):
        hotpotqa.main(["--input", str(raw), "--out_dir", str(tmp_path / "o"), "--debug"])
    from memagent_jax.serve.server import main as serve_main

    assert serve_main(["--model", missing]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(FlagError):
        serve_main(["--model", missing, "--debug"])


def test_generate_bad_weights_is_a_user_error(model_dir, tmp_path, capsys):
    folder = tmp_path / "no_weights"
    folder.mkdir()
    for name in os.listdir(model_dir):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(model_dir, name), folder / name)
    assert generate.main(["--model", str(folder), "--prompt", "hi", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --model {str(folder)!r}: ") and "model.safetensors" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------------------- sizes


def _rows_file(path, n=4) -> str:
    texts = ["The key is in the box. ", "It was green. ", "The bird sang. ", "Rain fell all day. "]
    rows = [QARecord("What is it?", texts[i % 4] * (3 + i), ("box",), index=i) for i in range(n)]
    write_eval_file(rows, path)
    return str(path)


@pytest.fixture
def slot_spy(monkeypatch):
    """Records the row slots of every DocumentEngine a MemoryAgent builds; refuses more slots than 64 (the old
    behaviour would compile and allocate them all)."""
    from memagent_jax.agent.runner import MemoryAgent

    seen = []
    real = MemoryAgent.document_engine

    def document_engine(self, batch_size, **kwargs):
        seen.append(batch_size)
        assert batch_size <= 64, f"{batch_size} row slots for a small file"
        return real(self, batch_size, **kwargs)

    monkeypatch.setattr(MemoryAgent, "document_engine", document_engine)
    return seen


@pytest.mark.slow
def test_answer_batch_size_is_clamped_to_the_rows(model_dir, tmp_path, slot_spy):
    path = _rows_file(tmp_path / "rows.jsonl")
    outs = {}
    for batch in ("100000", "4"):
        out = tmp_path / f"answers_{batch}.jsonl"
        assert (
            answer.main(["--model", model_dir, "--input", path, "--output", str(out), "--batch-size", batch] + SMALL)
            == 0
        )
        outs[batch] = [json.loads(line) for line in out.read_text().splitlines()]
    assert slot_spy == [4, 4]
    assert outs["100000"] == outs["4"] and len(outs["4"]) == 4


@pytest.mark.slow
def test_evaluate_batch_size_is_clamped_to_the_rows(model_dir, tmp_path, slot_spy):
    from memagent_jax.agent import AgentBudgets, MemoryAgent
    from memagent_jax.evaluation import evaluate_agent

    budgets = AgentBudgets(question_tokens=32, chunk_tokens=24, memory_tokens=16, answer_tokens=6, chunks_per_segment=2)
    agent = MemoryAgent.from_pretrained(model_dir, budgets=budgets, temperature=0.0)
    path = _rows_file(tmp_path / "qa_len_1x.jsonl", n=3)
    big = evaluate_agent(agent, path, batch_size=100000, scheduling="continuous", progress=False)
    small = evaluate_agent(agent, path, batch_size=3, scheduling="continuous", progress=False)
    assert slot_spy == [3, 3]
    assert [r.get("response") for r in big.rows] == [r.get("response") for r in small.rows]


# ----------------------------------------------------------------------------------------- train's memory check


class FakeDevice:
    def __init__(self, platform="gpu", limit=None, kind="NVIDIA H100 80GB HBM3"):
        self.platform, self.device_kind, self._limit = platform, kind, limit

    def memory_stats(self):
        return None if self._limit is None else {"bytes_limit": self._limit, "bytes_in_use": 0}


def test_memory_budget_rule(model_dir):
    from memagent_jax.planning import GiB
    from memagent_jax.rl.recipe import memory_budget

    cfg = grpo_cpu_config(model_dir)
    hw, source = memory_budget(cfg, [FakeDevice("cpu")] * 8, host_bytes=16 * GiB)
    assert hw.hbm_bytes == 2 * GiB and "16.0 GiB shared by 8 CPU devices" in source
    hw, source = memory_budget(cfg, [FakeDevice(limit=60 * GiB)])
    assert hw.hbm_bytes == 60 * GiB and "allocator" in source
    assert memory_budget(cfg, [FakeDevice()]) is None  # an accelerator that reports nothing, no config.hardware
    cfg.hardware = "h100"
    hw, source = memory_budget(cfg, [FakeDevice()])
    assert hw.name == "h100-80gb" and "config.hardware" in source
    cfg.hardware = "h1000"
    from memagent_jax.rl.recipe import TrainConfigError

    with pytest.raises(TrainConfigError, match="config.hardware: unknown hardware 'h1000'"):
        memory_budget(cfg, [FakeDevice()])


def test_train_refuses_a_run_that_cannot_fit_before_loading(model_dir, tmp_path, monkeypatch):
    from memagent_jax.planning import GiB
    from memagent_jax.rl import recipe
    from memagent_jax.rl.trainer import train

    big = {"rl.questions_per_step": 512, "rl.group_size": 64}
    recipe.validate_config(grpo_cpu_config(model_dir), device_count=8)  # the test config fits this machine
    monkeypatch.setattr(recipe, "host_memory_bytes", lambda: 8 * GiB)
    loaded = []
    monkeypatch.setattr("memagent_jax.models.load_hf_params", lambda *a, **k: loaded.append(1))
    with pytest.raises(recipe.TrainConfigError, match=r"^config\.memory_check: this run does not fit in memory: "):
        train(grpo_cpu_config(model_dir, **big), str(tmp_path / "run"))
    assert not loaded
    with pytest.raises(recipe.TrainConfigError, match="host RAM .8.0 GiB shared by 8 CPU devices.*memory_check=False"):
        recipe.validate_config(grpo_cpu_config(model_dir, **big), device_count=8)
    recipe.validate_config(grpo_cpu_config(model_dir, **big, memory_check=False), device_count=8)
    with pytest.raises(recipe.TrainConfigError, match="needs .* GiB of 60.0 GiB per device"):
        recipe.check_memory(
            grpo_cpu_config(model_dir, **{"rl.questions_per_step": 4096, "rl.group_size": 64}),
            device_count=1,
            devices=[FakeDevice(limit=60 * GiB)],
        )


# ----------------------------------------------------------------------------------------- launchers


def _launcher(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"launch_{name}_errors", os.path.join(REPO, "launch", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--tpu=--impersonate-service-account=x@y", "--zone", "z1"], "--tpu '--impersonate-service-account=x@y'"),
        (["--tpu", "pod1", "--zone=-q"], "--zone '-q': expected a zone"),
        (["--tpu", "pod 1", "--zone", "z1"], "--tpu 'pod 1'"),
        (["--tpu", "pod1", "--zone", "z1", "--project=--verbosity=debug"], "--project '--verbosity=debug'"),
        (["--tpu", "pod1", "--zone", "z1", "--module", "x;id"], "--module 'x;id'"),
    ],
)
def test_tpu_pod_refuses_names_that_pass_as_flags(argv, message, capsys):
    tpu_pod = _launcher("tpu_pod")
    with pytest.raises(SystemExit) as e:
        tpu_pod.main(argv + ["--teardown", "--dry_run"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_tpu_pod_collect_logs_folder_and_glued_values(capsys):
    tpu_pod = _launcher("tpu_pod")
    with pytest.raises(SystemExit) as e:
        tpu_pod.main(["--tpu", "pod1", "--zone", "z1", "--collect_logs=-o", "--num_workers", "1", "--dry_run"])
    assert e.value.code == 2 and "--collect_logs '-o'" in capsys.readouterr().err
    assert tpu_pod.main(["--tpu", "pod1", "--zone", "z1", "--project", "p-1", "--teardown", "--dry_run"]) == 0
    words = capsys.readouterr().out.split()
    assert "--zone=z1" in words and "--project=p-1" in words


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--job_name=-x"], "--job_name '-x'"),
        (["--partition", "gpu --qos=high"], "--partition 'gpu --qos=high'"),
        (["--account", "a;b"], "--account 'a;b'"),
        (["--time", "1:00 --begin=now"], "--time '1:00 --begin=now'"),
        (["--mem=-5G"], "--mem '-5G'"),
    ],
)
def test_slurm_refuses_names_that_pass_as_options(extra, message, capsys):
    slurm = _launcher("slurm")
    with pytest.raises(SystemExit) as e:
        slurm.main(["--nodes", "1", "--config", "c.py", "--workdir", "w", "--dry_run"] + extra)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_slurm_accepts_usual_names(capsys):
    slurm = _launcher("slurm")
    argv = ["--nodes", "2", "--config", "c.py", "--workdir", "w", "--dry_run", "--job_name", "q7b_run.1"]
    argv += ["--partition", "gpu,gpu-long", "--account", "lab_A", "--time", "2-00:00:00", "--mem", "0"]
    assert slurm.main(argv) == 0
    assert "#SBATCH --partition=gpu,gpu-long" in capsys.readouterr().out


def test_planned_document_length_comes_from_the_data(model_dir, tmp_path):
    from memagent_jax.rl.recipe import planned_doc_tokens

    cfg = grpo_cpu_config(model_dir)
    assert planned_doc_tokens(cfg) == cfg.data.synthetic_tokens
    cfg.data.train_file = _rows_file(tmp_path / "train.jsonl")
    measured = planned_doc_tokens(cfg)
    assert 0 < measured < 400  # the longest of four short documents, not the 32000 of a reference document
    cfg.agent.max_document_tokens = 10
    assert planned_doc_tokens(cfg) == 10


@pytest.mark.faults
def test_every_bad_input_error_class_is_a_user_error():
    """Each module's error class for bad input derives from errors.UserError, so every entry point reports it as
    one line with exit status 2 without a list of classes to keep in step (a new module's class is a UserError
    or a bug with its traceback)."""
    import importlib

    from memagent_jax import errors

    classes = {
        "memagent_jax.settings": ("SettingError", "ConfigError"),
        "memagent_jax.agent.chunking": ("AgentInputError",),
        "memagent_jax.models.config": ("ConfigError",),
        "memagent_jax.models.hf_io": ("CheckpointError",),
        "memagent_jax.models.safetensors_io": ("SafetensorsError", "CheckpointError"),
        "memagent_jax.models.sharding": ("MeshError",),
        "memagent_jax.storage.checkpoint": ("CheckpointError",),
        "memagent_jax.storage.paths": ("RemotePathError",),
        "memagent_jax.data.records": ("DataFormatError",),
        "memagent_jax.data.buildcli": ("BuildError",),
        "memagent_jax.distributed": ("DistributedError",),
        "memagent_jax.planning.errors": ("PlanError",),
        "memagent_jax.pipeline": ("PipelineConfigError",),
        "memagent_jax.serve.server": ("ServeArgsError",),
        "memagent_jax.rl.recipe": ("TrainConfigError",),
        "memagent_jax.model_flags": ("FlagError",),
    }
    for module_name, names in classes.items():
        module = importlib.import_module(module_name)
        for name in names:
            cls = getattr(module, name)
            assert issubclass(cls, errors.UserError), f"{module_name}.{name}"
            assert issubclass(cls, errors.user_error_types()), f"{module_name}.{name}"
    # A checkpoint that cannot be restored stays a RuntimeError for callers that caught it as one.
    from memagent_jax.storage.checkpoint import CheckpointError

    assert issubclass(CheckpointError, RuntimeError)
    assert not errors.is_user_error(RuntimeError("a bug")) and not errors.is_user_error(KeyError("x"))

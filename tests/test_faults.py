"""Fault injection: bad rows, bad weights, bad checkpoints, bad configs, hostile launcher values, resume leftovers.

Each test is one row of the "fault or bad input | what the user sees | data kept" table of docs/guides/evaluation.md:
it injects the fault and checks both what the user is told (an error naming the file / row / field / tensor / step)
and that nothing good is lost (the other rows, the older checkpoints, the input file).
"""

import importlib.util
import json
import os
import shlex
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_tiny import SMALL_ANSWER_FLAGS, grpo_cpu_config, make_agent_model_dir
from memagent_jax import answer
from memagent_jax import evaluate as ev
from memagent_jax.data.formats import open_file, write_eval_file
from memagent_jax.data.records import DataFormatError, QARecord
from memagent_jax.models.hf_io import NonFiniteWeightsError, clean_stale_exports, load_hf_params, save_hf_checkpoint
from memagent_jax.models.safetensors_io import SafetensorsFile, write_safetensors
from memagent_jax.rl.metrics import MetricsWriter, truncate_jsonl
from memagent_jax.storage.checkpoint import Checkpointer, CheckpointError

pytestmark = pytest.mark.faults

REPO = os.path.join(os.path.dirname(__file__), "..")
SMALL = SMALL_ANSWER_FLAGS
GOOD = [
    {"context": "The key is in the box. " * 4, "input": "Where is the key?", "answers": ["box"]},
    {"context": "It was green. " * 7, "input": "What colour?", "answers": ["green"]},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_agent_model_dir(tmp_path_factory.mktemp("faults") / "model", variant="qwen2", seed=1)


def poison(src: str, dst: str, tensor: str, value=np.nan) -> str:
    """A copy of the model folder `src` whose `tensor` has one value replaced (NaN by default)."""
    shutil.copytree(src, dst)
    weights = SafetensorsFile(os.path.join(src, "model.safetensors"))
    names = weights.names()
    assert tensor in names

    def tensors():
        for name in names:
            a = np.array(weights.read(name))
            if name == tensor:
                a.reshape(-1)[0] = value
            yield name, a

    write_safetensors(
        os.path.join(dst, "model.safetensors"), [(n, weights.shape(n), weights.dtype(n)) for n in names], tensors()
    )
    return dst


@pytest.fixture(scope="module")
def nan_model_dir(model_dir, tmp_path_factory):
    # The final norm's first weight: every hidden state gets a NaN, so every logit row does.
    return poison(model_dir, str(tmp_path_factory.mktemp("faults_nan") / "model"), "model.norm.weight")


def _bad_jsonl(path) -> str:
    """Rows: 0 good, 1 malformed JSON, 2 a JSON list, 3 non-UTF-8 context, 4 missing 'answers', 5 good."""
    lines = [
        json.dumps(GOOD[0]).encode(),
        b'{"context": "x", "input": ',
        b"[1, 2]",
        b'{"context": "caf\xe9 \xff", "input": "q?", "answers": ["a"]}',
        json.dumps({"context": "text", "input": "q?"}).encode(),
        json.dumps(GOOD[1]).encode(),
    ]
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return str(path)


# ------------------------------------------------------------------------------------------- 1. bad rows


def test_reader_keeps_bad_rows_apart(tmp_path):
    path = _bad_jsonl(tmp_path / "rows.jsonl")
    with pytest.raises(DataFormatError, match=r"rows\.jsonl"):
        open_file(path)  # strict by default (training data): the file is refused
    rows = open_file(path, on_bad_row="keep")
    assert len(rows) == 6 and sorted(rows.bad_rows) == [1, 2, 3]
    assert rows[0].answers == ("box",) and rows[5].answers == ("green",)
    expected = {
        1: (None, r"row 1: is not valid JSON \(line 2, column \d+\)"),
        2: (None, r"row 2: must be a JSON object, got list \(line 3\)"),
        3: ("context", r"row 3: field 'context' holds bytes that are not UTF-8 text"),
        4: ("answers", r"row 4: field 'answers' is missing"),
    }
    for i, (field, pattern) in expected.items():
        with pytest.raises(DataFormatError, match=pattern) as err:
            rows[i]
        assert err.value.row == i and err.value.field == field and err.value.path == path
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([GOOD[0], 7, GOOD[1]]))
    rows = open_file(array, on_bad_row="keep")
    assert len(rows) == 3 and rows[2].question == "What colour?"
    with pytest.raises(DataFormatError, match=r"rows\.json row 1: must be a JSON object, got int"):
        rows[1]


def test_answer_batch_keeps_good_rows_and_reports_bad_ones(model_dir, tmp_path, capsys):
    path = _bad_jsonl(tmp_path / "in.jsonl")
    before = open(path, "rb").read()
    out = tmp_path / "answers.jsonl"
    code = answer.main(["--model", model_dir, "--input", path, "--output", str(out)] + SMALL)
    err = capsys.readouterr().err
    assert code == 1
    assert f"wrote {out}: 2 answered, 4 failed (4 bad rows, 0 with non-finite logits)" in err
    rows = {r["row"]: r for r in map(json.loads, out.read_text(encoding="utf-8").splitlines())}
    assert sorted(rows) == [0, 1, 2, 3, 4, 5] and not os.path.exists(str(out) + ".partial")
    assert isinstance(rows[0]["response"], str) and isinstance(rows[5]["response"], str) and "error" not in rows[0]
    assert rows[3]["field"] == "context" and "in.jsonl row 3" in rows[3]["error"]
    assert rows[4]["field"] == "answers" and "in.jsonl row 4: field 'answers' is missing" in rows[4]["error"]
    assert (
        "in.jsonl row 1: is not valid JSON" in rows[1]["error"] and "row 2: must be a JSON object" in rows[2]["error"]
    )
    # Output over the input: refused before anything loads; the input is untouched.
    capsys.readouterr()
    assert answer.main(["--model", model_dir, "--input", path, "--output", path] + SMALL) == 2
    assert "is the input file; refusing to write over it" in capsys.readouterr().err
    assert open(path, "rb").read() == before


ANSWER_ARGUMENT_ERRORS = {
    "missing model": (["--model", "/nonexistent"], "--model '/nonexistent': no such folder"),
    "missing tokenizer": (["--model", "{model}", "--tokenizer", "/nonexistent"], "--tokenizer '/nonexistent': no such"),
    "no tokenizer files": (["--model", "{weights_only}"], "no tokenizer files"),
    "batch size": (
        ["--model", "{model}", "--input", "{doc}", "--output", "{tmp}/o.jsonl", "--batch-size", "0"],
        "--batch-size must be >= 1, got 0",
    ),
    "top p": (
        ["--model", "{model}", "--agent.top_p", "2"],
        "--agent.top_p must be a finite number in (0, 1] (1 = off), got 2.0",
    ),
    "temperature": (
        ["--model", "{model}", "--agent.temperature", "nan"],
        "--agent.temperature must be a finite number >= 0 (0 = greedy), got nan",
    ),
}


@pytest.mark.parametrize("case", list(ANSWER_ARGUMENT_ERRORS))
def test_answer_arguments_fail_early_and_clearly(case, model_dir, tmp_path, capsys):
    no_tok = tmp_path / "weights_only"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(model_dir, name), no_tok / name)
    doc = tmp_path / "doc.txt"
    doc.write_text("text")
    argv, message = ANSWER_ARGUMENT_ERRORS[case]
    names = dict(model=model_dir, weights_only=str(no_tok), doc=str(doc), tmp=str(tmp_path))
    argv = [a.format(**names) for a in argv]
    if "--input" not in argv:
        argv += ["--question", "q?", "--document", str(doc)]
    assert answer.main(argv) == 2, argv
    assert message in capsys.readouterr().err, argv


def _eval_main(*args):
    from absl import flags

    argv = ["evaluate", "--config", os.path.join(REPO, "configs", "evaluate.py") + ":cpu", *args]
    fv = flags.FlagValues()
    ev.define_flags(fv, sys_argv=argv)
    fv(argv)
    ev.main(["evaluate"])


EVAL_BUDGETS = [
    "--config.agent.question_tokens=32",
    "--config.agent.chunk_tokens=24",
    "--config.agent.memory_tokens=16",
    "--config.agent.answer_tokens=6",
    "--config.agent.chunks_per_segment=2",
    "--config.agent.temperature=0",
    "--config.plot=False",
    "--config.warmup=False",
    "--config.progress=False",
]


def test_evaluate_keeps_good_rows_and_exits_1(model_dir, tmp_path, capsys):
    path = _bad_jsonl(tmp_path / "qa_len_1x.jsonl")
    workdir = tmp_path / "eval"
    with pytest.raises(SystemExit) as exit_info:
        _eval_main(
            "--workdir", str(workdir), f"--config.models=m={model_dir}", f"--config.eval_files={path}", *EVAL_BUDGETS
        )
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "warning: 4 of 6 rows failed (0 with non-finite model outputs; m/qa_len_1x: 4)" in err
    result = json.loads((workdir / "results.json").read_text())["results"][0]
    assert (result["n"], result["errors"], result["skipped"]) == (2, 4, 4)
    rows = {
        r["row"]: r for r in map(json.loads, (workdir / "predictions" / "m__qa_len_1x.jsonl").read_text().splitlines())
    }
    assert "scores" in rows[0] and "scores" in rows[5]
    assert rows[4]["field"] == "answers" and "qa_len_1x.jsonl row 4" in rows[4]["error"]
    # An evaluation file inside the workdir under an output's name is refused before any model loads.
    inside = workdir / "results.json"
    with pytest.raises(SystemExit) as exit_info:
        _eval_main(
            "--workdir", str(workdir), f"--config.models=m={model_dir}", f"--config.eval_files={inside}", *EVAL_BUDGETS
        )
    assert exit_info.value.code == 2 and "refusing to write over an input" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- 2. bad weights


def test_nonfinite_weights_named_at_load(model_dir, nan_model_dir, tmp_path):
    with pytest.raises(NonFiniteWeightsError, match=r"tensor 'model\.norm\.weight' holds 1 non-finite values") as e:
        load_hf_params(nan_model_dir)
    assert e.value.tensor == "model.norm.weight" and "allow_nonfinite=True" in str(e.value)
    inf_dir = poison(model_dir, str(tmp_path / "inf"), "model.layers.1.mlp.up_proj.weight", np.inf)
    with pytest.raises(NonFiniteWeightsError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf_params(inf_dir)
    params, _ = load_hf_params(nan_model_dir, allow_nonfinite=True)
    assert np.isnan(np.asarray(params["final_norm"]["weight"])[0])


def test_nonfinite_outputs_are_errors_not_empty_answers(nan_model_dir, tmp_path, capsys):
    path = tmp_path / "qa.jsonl"
    write_eval_file(
        [QARecord(r["input"], r["context"], tuple(r["answers"]), index=i) for i, r in enumerate(GOOD)], path
    )
    out = tmp_path / "answers.jsonl"
    base = ["--model", nan_model_dir, "--input", str(path), "--output", str(out)] + SMALL
    assert answer.main(base) == 2
    assert "tensor 'model.norm.weight'" in capsys.readouterr().err
    assert answer.main(base + ["--allow-nonfinite-weights"]) == 1
    assert "0 answered, 2 failed (0 bad rows, 2 with non-finite logits)" in capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["answer"] is None and "not finite (NaN / inf)" in r["error"] for r in rows) and len(rows) == 2
    from memagent_jax.agent import AgentBudgets

    budgets = AgentBudgets(question_tokens=32, chunk_tokens=24, memory_tokens=16, answer_tokens=6, chunks_per_segment=2)
    results = ev.evaluate_models(
        {"nan": nan_model_dir},
        [str(path)],
        str(tmp_path / "eval"),
        budgets=budgets,
        temperature=0.0,
        progress=False,
        plot=False,
        warmup=False,
        allow_nonfinite_weights=True,
    )
    r = results.results[0]
    assert (r.n, r.errors, r.nonfinite) == (0, 2, 2) and all("not finite" in row["error"] for row in r.rows)
    assert "2 of 2 rows failed (2 with non-finite" in ev.failure_summary(results)


# ------------------------------------------------------------------------------------------- 3. checkpoints


def _state(seed: float):
    return {
        "w": jnp.arange(600, dtype=jnp.float32).reshape(6, 100) / 7 + seed,
        "m": jnp.full((300,), float(seed), jnp.float32),
        "step": jnp.int32(seed),
    }


def _target():
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _state(0))


def _flip_a_bit(step_dir: str) -> None:
    files = [
        os.path.join(root, f)
        for root, _, names in os.walk(os.path.join(step_dir, "state"))
        for f in names
        if os.sep + "d" + os.sep in os.path.join(root, f) + os.sep or os.path.basename(root) == "d"
    ]
    biggest = max(files, key=os.path.getsize)
    data = bytearray(open(biggest, "rb").read())
    data[len(data) // 2] ^= 0x04
    open(biggest, "wb").write(data)


def test_corrupt_newest_checkpoint_falls_back(tmp_path, caplog):
    directory = str(tmp_path / "ckpt")
    with Checkpointer(directory, async_save=False) as c:
        for step in (1, 2, 3):
            c.save(step, _state(step))
    _flip_a_bit(os.path.join(directory, "3"))
    open(os.path.join(directory, "2", "meta", "metadata"), "w").close()  # an empty metadata file
    with Checkpointer(directory, async_save=False) as c:
        with pytest.raises(CheckpointError, match=r"ckpt/3: leaf \['w'\] does not match the checksum"):
            c.restore(_target(), step=3)  # an explicit step: verified, no fallback
        restored = c.restore(_target())
        assert restored.step == 1 and [s for s, _ in restored.skipped] == [3, 2]
        assert "cannot read the checkpoint's metadata" in restored.skipped[1][1]
        assert str(os.path.join(directory, "2", "meta")) in restored.skipped[1][1]
        np.testing.assert_array_equal(np.asarray(restored.state["w"]), np.asarray(_state(1)["w"]))
        assert c.all_steps() == [1] and len(os.listdir(os.path.join(directory, "quarantine"))) == 2
        c.save(2, _state(2))  # the quarantined steps can be saved again
        assert c.restore(_target()).step == 2
    assert "is unusable" in caplog.text


def test_checkpoint_shape_mismatch_and_nothing_usable(tmp_path):
    directory = str(tmp_path / "ckpt")
    with Checkpointer(directory, async_save=False) as c:
        c.save(1, _state(1))
        wrong = dict(_target(), m=jax.ShapeDtypeStruct((301,), jnp.float32))
        with pytest.raises(CheckpointError, match=r"ckpt/1: (cannot be restored|leaf \['m'\] has shape)"):
            c.restore(wrong, step=1)
        with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*step 1:"):
            c.restore(wrong)


def test_nonfinite_state_is_never_saved_and_prunes_nothing(tmp_path):
    directory = str(tmp_path / "ckpt")
    with Checkpointer(directory, max_to_keep=2, async_save=False) as c:
        c.save(1, _state(1))
        c.save(2, _state(2))
        bad = dict(_state(3), m=_state(3)["m"].at[5].set(jnp.inf))
        with pytest.raises(
            CheckpointError, match=r"step 3: refusing to save a non-finite state \(leaf \['m'\] holds 1"
        ):
            c.save(3, bad)
        assert c.all_steps() == [1, 2]
        assert c.restore(_target()).step == 2


# ------------------------------------------------------------------------------------------- 4. config up front


def _grpo(model_dir, **overrides):
    return grpo_cpu_config(model_dir, **overrides)


@pytest.fixture(scope="module")
def bad_train_inputs(model_dir, tmp_path_factory):
    """Broken files a training config may name: {name: path}."""
    root = tmp_path_factory.mktemp("bad_train_inputs")
    (root / "train.jsonl").write_text(json.dumps({"context": "x", "input": "q?"}) + "\n")
    (root / "broken.jsonl").write_text('{"context": \n')
    (root / "templates.json").write_text('{"memory_update": ')
    (root / "unknown.json").write_text('{"memory_updat": "x"}')
    (root / "no_placeholders.json").write_text('{"final_answer": "Answer now."}')
    (root / "no_tokenizer").mkdir()
    shutil.copy(os.path.join(model_dir, "config.json"), root / "no_tokenizer" / "config.json")
    shutil.copytree(model_dir, root / "bad_config")
    (root / "bad_config" / "config.json").write_text("{")
    return {p.name: str(p) for p in root.iterdir()}


TRAIN_CONFIG_ERRORS = [
    ({"rl.learning_rate": -1e-6}, r"config\.rl\.learning_rate must be a finite number > 0"),
    ({"rl.learning_rate": 0.0}, r"config\.rl\.learning_rate .*at 0 nothing is learned"),
    ({"agent.top_p": 2.0}, r"config\.agent\.top_p must be a finite number in \(0, 1\] \(1 = off\), got 2\.0"),
    ({"agent.temperature": 0.0}, r"config\.agent\.temperature .*> 0"),
    ({"agent.temperature": float("nan")}, r"config\.agent\.temperature must be a finite number >= 0"),
    ({"rl.clip_low": 1.5}, r"config\.rl\.clip_low .*in \[0, 1\)"),
    ({"rl.clip_high": -0.1}, r"config\.rl\.clip_high must be a finite number >= 0"),
    ({"rl.dual_clip": 0.5}, r"config\.rl\.dual_clip .*> 1, or 0"),
    ({"rl.kl_coef": -1.0}, r"config\.rl\.kl_coef must be a finite number >= 0"),
    ({"rl.answer_advantage": "none"}, r"config\.rl\.answer_advantage must be one of \('shared', 'positive'\)"),
    ({"rl.max_grad_norm": 0.0}, r"config\.rl\.max_grad_norm must be a finite number > 0"),
    ({"rl.group_size": 1}, r"config\.rl\.group_size must be an integer >= 2"),
    ({"rl.num_minibatches": 1000}, r"config\.rl\.num_minibatches must be an integer in \[1, 16\]"),
    (
        {"agent.chunk_tokens": 480},
        r"config\.agent budgets need a context of more than 576 tokens.*max_position_embeddings is 512",
    ),
    ({"data.train_file": "train.jsonl"}, r"config\.data\.train_file: .*train\.jsonl row 0: field 'answers'"),
    ({"data.train_file": "broken.jsonl"}, r"config\.data\.train_file: .*broken\.jsonl"),
    ({"agent.templates": "templates.json"}, r"config\.agent\.templates: .*templates\.json: not valid JSON"),
    ({"agent.templates": "unknown.json"}, r"config\.agent\.templates: .*unknown template field"),
    ({"model.path": "no_tokenizer"}, r"config\.model\.path: .*no_tokenizer' holds no tokenizer files"),
    ({"model.path": "bad_config"}, r"config\.model\.path: .*config\.json does not parse as JSON"),
    ({"model.param_dtype": "float8"}, r"config\.model\.param_dtype must be one of"),
    ({"agent.memory_update": "Notes: {memory}"}, r"config\.agent: memory_update: placeholder \{question\} must"),
    ({"agent.templates": "no_placeholders.json"}, r"config\.agent\.templates: .*final_answer: placeholder"),
]


@pytest.mark.parametrize(
    "overrides, pattern",
    TRAIN_CONFIG_ERRORS,
    ids=[f"{next(iter(o))}={next(iter(o.values()))}" for o, _ in TRAIN_CONFIG_ERRORS],
)
def test_train_config_errors_come_before_any_model(
    overrides, pattern, model_dir, bad_train_inputs, tmp_path, monkeypatch
):
    import transformers

    from memagent_jax import models
    from memagent_jax.rl.recipe import TrainConfigError
    from memagent_jax.rl.trainer import train

    def no_loading(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the config was checked")

    monkeypatch.setattr(models, "load_hf_params", no_loading)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_loading)
    overrides = {k: bad_train_inputs.get(v, v) if isinstance(v, str) else v for k, v in overrides.items()}
    with pytest.raises(TrainConfigError, match=pattern):
        train(_grpo(model_dir, **overrides), str(tmp_path / "w"))


# ------------------------------------------------------------------------------------------- 5. launchers


def _launcher(name):
    spec = importlib.util.spec_from_file_location(f"launch_{name}_faults", os.path.join(REPO, "launch", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("hostile", ["x\nsrun rm -rf /", "x\rmalicious", "x\x00y", "x\ty", "x\x1b[2J", "x\x7f"])
def test_launchers_reject_control_characters(hostile, capsys):
    slurm, tpu_pod, local = _launcher("slurm"), _launcher("tpu_pod"), _launcher("local")
    base = ["--nodes", "1", "--config", "configs/grpo.py", "--workdir", "/w", "--dry_run"]
    slurm_cases = [
        ["--job_name", hostile],
        ["--partition", hostile],
        ["--account", hostile],
        ["--time", hostile],
        ["--mem", hostile],
        ["--repo_dir", hostile],
        ["--log_dir", hostile],
        ["--python", hostile],
        ["--module", hostile],
        ["--env", f"K={hostile}"],
        [f"--sbatch_arg=--qos={hostile}"],
        [f"--config.model.path={hostile}"],
        ["--script", hostile],
    ]
    for extra in slurm_cases:
        with pytest.raises(SystemExit) as e:
            slurm.main(base + extra)
        assert e.value.code == 2
        assert "control character" in capsys.readouterr().err, extra
    args = slurm.build_parser().parse_args(["--nodes", "1", "--config", "c.py", "--workdir", hostile])
    with pytest.raises(slurm.LaunchError, match="control character"):
        slurm.render(args, [])  # even a caller that skips the checks gets no script
    tpu_base = ["--tpu", "t", "--zone", "z", "--config", "c.py", "--workdir", "gs://b/r", "--dry_run"]
    for extra in (
        ["--setup", f"echo {hostile}"],
        ["--env", f"K={hostile}"],
        [f"--config.seed={hostile}"],
        ["--remote_dir", hostile],
        ["--project", hostile],
        ["--log_dir", hostile],
    ):
        with pytest.raises(SystemExit) as e:
            tpu_pod.main(tpu_base + extra)
        assert e.value.code == 2 and "control character" in capsys.readouterr().err, extra
    with pytest.raises(SystemExit) as e:
        local.main(["--num_processes", "2", "--log_dir", hostile, "--dry_run", "--", "true"])
    assert e.value.code == 2 and "control character" in capsys.readouterr().err
    # The local launcher starts its command as an argument list (no shell, no script): a multi-line `python -c`
    # program is passed through whole, quoted in the dry run's printout, never run as separate lines.
    program = f"print('{hostile}')"
    assert local.main(["--num_processes", "2", "--dry_run", "--", "python", "-c", program]) in (0, None)
    assert shlex.quote(program) in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- 6. resume leftovers


def test_resumed_metrics_keep_one_row_per_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    assert truncate_jsonl(str(path), 3) == 3  # steps 4, 5 and the torn line
    with MetricsWriter(str(tmp_path), tensorboard=False, console=False, process_index=0, resume_step=2) as w:
        w.write(3, {"loss": 30.0})
        w.write(4, {"loss": 40.0})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_interrupted_export_is_cleaned_up(model_dir, tmp_path):
    params, config = load_hf_params(model_dir)
    out = tmp_path / "export"
    stale = [tmp_path / "export.tmp-killed", tmp_path / "export.old-123"]
    for folder in stale:
        folder.mkdir()
        (folder / "model-00001-of-00001.safetensors").write_bytes(b"partial")
    keep = tmp_path / "export_other.tmp-x"
    keep.mkdir()
    save_hf_checkpoint(params, config, str(out), base_folder=model_dir)
    assert not any(f.exists() for f in stale) and keep.exists() and (out / "config.json").exists()
    (tmp_path / "export.tmp-again").mkdir()
    assert clean_stale_exports(str(out)) == [str(tmp_path / "export.tmp-again")]


@pytest.mark.slow  # two learner compiles (~20 s on 2 cores)
def test_padding_only_minibatches_do_not_move_adamw():
    """4 mini-batches over 2 real conversations + 2 padding rows: the padding-only updates are skipped, so the
    result equals 2 mini-batches over the real rows alone (before the fix, AdamW's momentum and weight decay moved
    the params on every padding-only update)."""
    from memagent_jax.models import abstract_params
    from memagent_jax.models.presets import preset_config
    from memagent_jax.rl.batch import build_conversation_batch
    from memagent_jax.rl.learner import Learner, LearnerConfig, OptimizerConfig
    from memagent_jax.rl.losses import LossConfig

    config = preset_config("tiny", vocab_size=64)
    rng = np.random.default_rng(0)

    def params():
        return jax.tree.map(
            lambda a: jnp.asarray(0.05 * np.random.default_rng(1).normal(size=a.shape), a.dtype),
            abstract_params(config),
        )

    prompts = [rng.integers(3, 64, size=5), rng.integers(3, 64, size=4)]
    responses = [rng.integers(3, 64, size=3), rng.integers(3, 64, size=2)]
    logps = [np.full(len(r), -np.log(64.0)) for r in responses]
    padded = build_conversation_batch(prompts, responses, logps, [1.0, -1.0], rows_multiple=4, length_multiple=8)
    real = build_conversation_batch(prompts, responses, logps, [1.0, -1.0], rows_multiple=2, length_multiple=8)
    assert padded.num_rows == 4 and not padded.loss_mask[2:].any()
    opt = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1)
    results = []
    for batch, m in ((padded, 4), (real, 2)):
        learner = Learner(config, LearnerConfig(loss=LossConfig(kl_coef=0.0), optimizer=opt, num_minibatches=m))
        state, metrics = learner.train_step(learner.init_state(params()), batch)
        results.append((jax.tree.map(np.asarray, state.params), metrics))
    (p4, m4), (p2, m2) = results
    assert m4["empty_updates"] == 2 and m2["empty_updates"] == 0 and m4["nonfinite_updates"] == 0
    for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert m4["loss"] == pytest.approx(m2["loss"], rel=1e-5)

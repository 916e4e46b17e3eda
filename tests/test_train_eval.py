"""Evaluation during training (config.eval): when it runs, what it records, the best export, resume, config errors."""

import json
import os

import pytest

from hf_tiny import grpo_cpu_config, make_agent_model_dir
from memagent_jax.data.formats import write_eval_file
from memagent_jax.data.records import QARecord
from memagent_jax.evaluation.report import Estimate
from memagent_jax.rl import validation
from memagent_jax.rl.recipe import TrainConfigError, validate_config
from memagent_jax.rl.trainer import train

FILLER = "The quiet river stood near the old bridge in the morning. "


def grpo_config(model_dir, **overrides):
    return grpo_cpu_config(model_dir, **{"rl.learning_rate": 1e-3, **overrides})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_agent_model_dir(tmp_path_factory.mktemp("train_eval") / "model", seed=2)


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    """Four rows whose answer 'e' a random model's raw answer often contains (sub_em): accuracies between 0 and 1."""
    path = tmp_path_factory.mktemp("eval_files") / "qa_len_1.jsonl"
    rows = [
        QARecord(question=f"What is fact {i}?", document=FILLER * (1 + i), answers=("e",), index=10 + i)
        for i in range(5)
    ]
    write_eval_file(rows, str(path))
    return str(path)


def eval_overrides(eval_file, **more):
    return {
        "eval.files": eval_file,
        "eval.every_steps": 2,
        "eval.max_questions": 4,
        "eval.extract": "raw",
        "eval.batch_size": 2,
        **more,
    }


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_eval_steps_history_best_export_and_equal_to_evaluate(model_dir, eval_file, tmp_path):
    from memagent_jax.agent import AgentSettings, MemoryAgent
    from memagent_jax.evaluation.loop import evaluate_agent, load_model

    workdir = str(tmp_path / "run")
    cfg = grpo_config(model_dir, steps=3, **eval_overrides(eval_file, **{"eval.at_start": True}))
    train(cfg, workdir)
    metrics = {m["step"]: m for m in _jsonl(os.path.join(workdir, "metrics.jsonl"))}
    evaluated = sorted(s for s, m in metrics.items() if "eval/accuracy_mean" in m)
    assert evaluated == [0, 2, 3]  # at the start, every 2nd step, and at the end (3 is not a multiple of 2)
    assert sorted(metrics) == [0, 1, 2, 3]
    history = _jsonl(os.path.join(workdir, validation.HISTORY_FILE))
    assert [h["step"] for h in history] == [0, 2, 3]
    for h in history:
        assert h["file"] == eval_file and h["file_key"] == "qa_len_1" and h["n"] == 4 and h["interval"] == "wilson"
        assert h["low"] <= h["accuracy"] <= h["high"]
        m = metrics[h["step"]]
        assert m["eval/qa_len_1/accuracy"] == h["accuracy"] and m["eval/qa_len_1/n"] == 4
        assert m["eval/qa_len_1/accuracy_low"] == h["low"] and m["eval/accuracy_mean"] == h["accuracy"]
    best_step = max(history, key=lambda h: (h["accuracy"], -h["step"]))["step"]  # the first of the best
    best_dir = os.path.join(workdir, validation.BEST_DIR)
    with open(os.path.join(best_dir, validation.BEST_FILE)) as f:
        best = json.load(f)
    assert best["step"] == best_step and best["accuracy"] == {"qa_len_1": best["accuracy_mean"]}
    assert not [e for e in os.listdir(workdir) if ".tmp-" in e or ".old-" in e]

    def accuracy_of(folder):
        """What the evaluation loop gives for an exported folder, with train's evaluation settings (greedy)."""
        model = load_model(folder)
        s = AgentSettings.load(folder)
        agent = MemoryAgent(model.params, model.config, model.tokenizer, budgets=s.budgets, templates=s.templates)
        return evaluate_agent(agent, eval_file, metric="sub_em", extract="raw", max_questions=4, progress=False)

    # The last step's params are the regular export: the recorded accuracy is the evaluation loop's.
    final = accuracy_of(os.path.join(workdir, "export"))
    assert final.accuracy.mean == pytest.approx(metrics[3]["eval/qa_len_1/accuracy"], abs=1e-9)
    assert final.n == 4
    # The best export loads, answers, and gives its recorded accuracy.
    again = accuracy_of(best_dir)
    assert again.accuracy.mean == pytest.approx(best["accuracy_mean"], abs=1e-9)
    assert all(isinstance(r["response"], str) for r in again.rows)


def _fake_evaluation(monkeypatch, by_step):
    """evaluate_policy replaced: the accuracy of the step being evaluated from `by_step`; returns the calls."""
    calls = []
    current = {}
    run = validation.TrainingEvaluation.run

    def spy_run(self, step, params):
        current["step"] = step
        return run(self, step, params)

    def fake(agent, files, ev):
        step = current["step"]
        calls.append(step)
        return [Estimate(by_step[step], 0.0, 1.0, 4, "wilson") for _ in files]

    monkeypatch.setattr(validation.TrainingEvaluation, "run", spy_run)
    monkeypatch.setattr(validation, "evaluate_policy", fake)
    return calls


@pytest.mark.slow
def test_resume_keeps_the_best_and_does_not_evaluate_again(model_dir, eval_file, tmp_path, monkeypatch):
    calls = _fake_evaluation(monkeypatch, {0: 0.25, 2: 0.75, 4: 0.5})
    workdir = str(tmp_path / "run")
    overrides = eval_overrides(eval_file, **{"eval.at_start": True})
    train(grpo_config(model_dir, steps=2, **overrides), workdir)  # "killed" after step 2 (checkpoint at 2)
    assert calls == [0, 2]
    best_file = os.path.join(workdir, validation.BEST_DIR, validation.BEST_FILE)
    with open(best_file) as f:
        assert json.load(f)["step"] == 2
    os.remove(best_file)  # the best-so-far comes back from the checkpoint, not from this file
    calls.clear()
    train(grpo_config(model_dir, steps=4, **overrides), workdir)  # resumes at step 2
    assert calls == [4]  # steps 0 and 2 are not evaluated again
    assert not os.path.exists(best_file)  # step 4 (0.5) does not beat the restored best (step 2, 0.75)
    assert [h["step"] for h in _jsonl(os.path.join(workdir, validation.HISTORY_FILE))] == [0, 2, 4]
    from memagent_jax.storage.checkpoint import Checkpointer

    with Checkpointer(os.path.join(workdir, "checkpoints")) as checkpoints:
        meta = checkpoints._read_meta(4)["metadata"]  # the step-4 checkpoint carries the best so far on
    assert meta[validation.METADATA_KEY]["step"] == 2


def test_eval_off_leaves_metrics_and_files_as_before(model_dir, tmp_path):
    workdir = str(tmp_path / "off")
    cfg = grpo_config(model_dir, steps=2)
    assert cfg.eval.every_steps == 0 and cfg.eval.files == ""
    train(cfg, workdir)
    assert sorted(os.listdir(workdir)) == ["checkpoints", "export", "metrics.jsonl", "tensorboard"]
    rows = _jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [m["step"] for m in rows] == [1, 2]
    assert not [k for m in rows for k in m if k.startswith("eval")]


@pytest.mark.faults
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"eval.every_steps": -1}, r"^config\.eval\.every_steps must be an integer >= 0"),
        ({"eval.every_steps": 2}, r"^config\.eval\.files must name at least one evaluation file"),
        ({"eval.every_steps": 2, "eval.files": "{tmp}/nope.jsonl"}, r"^config\.eval\.files: .*nope\.jsonl' does not"),
        ({"eval.every_steps": 2, "eval.files": "{tmp}/none_*.jsonl"}, r"^config\.eval\.files: pattern .* matches no"),
        ({"eval.temperature": -1.0}, r"^config\.eval\.temperature must be a finite number >= 0"),
        ({"eval.top_p": 0.0}, r"^config\.eval\.top_p must be a finite number in \(0, 1\]"),
        ({"eval.max_questions": -2}, r"^config\.eval\.max_questions must be an integer >= 0"),
        ({"eval.metric": "bleu"}, r"^config\.eval\.metric must be one of"),
        ({"eval.extract": "last"}, r"^config\.eval\.extract must be one of"),
        ({"eval.batch_size": 0}, r"^config\.eval\.batch_size must be an integer >= 1"),
        ({"eval.at_end": "yes"}, r"^config\.eval\.at_end must be True or False"),
    ],
    ids=lambda v: "-".join(f"{k}={v}" for k, v in v.items()) if isinstance(v, dict) else None,
)
def test_bad_eval_values_name_the_field(overrides, message, model_dir, tmp_path):
    overrides = {k: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v for k, v in overrides.items()}
    cfg = grpo_config(model_dir)
    for key, value in overrides.items():  # types the ConfigDict would refuse on assignment
        cfg.eval._fields[key.split(".")[1]] = value
    with pytest.raises(TrainConfigError, match=message) as info:
        validate_config(cfg, device_count=1)
    assert "\n" not in str(info.value)


@pytest.mark.faults
def test_bad_eval_file_is_named(model_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TrainConfigError, match=r"^config\.eval\.files: .*bad\.json"):
        validate_config(grpo_config(model_dir, **{"eval.every_steps": 1, "eval.files": str(bad)}), device_count=1)


def test_due_steps():
    ev = validation.EvalSettings(files="x", every_steps=3, at_start=True, at_end=True)
    assert [s for s in range(0, 8) if ev.due(s, 7)] == [0, 3, 6, 7]
    ev = validation.EvalSettings(files="x", every_steps=3, at_start=False, at_end=False)
    assert [s for s in range(0, 8) if ev.due(s, 7)] == [3, 6]
    assert not any(validation.EvalSettings(files="x").due(s, 7) for s in range(8))  # every_steps 0: off

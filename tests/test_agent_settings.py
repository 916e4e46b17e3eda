"""Self-describing exports: memagent_agent.json is written beside the HF files and read back by answer,
evaluate and MemoryAgent.from_pretrained; flags override it; a plain folder keeps the documented defaults."""

import json
import os
import shutil

import numpy as np
import pytest

from hf_tiny import make_agent_model_dir
from memagent_jax import answer
from memagent_jax.agent import (
    SETTINGS_FILE,
    AgentBudgets,
    AgentSettings,
    AgentSettingsError,
    AgentTemplates,
    MemoryAgent,
    write_agent_settings,
)

BUDGETS = AgentBudgets(question_tokens=32, chunk_tokens=24, memory_tokens=16, answer_tokens=6, chunks_per_segment=2)
TEMPLATES = AgentTemplates(
    memory_update="Q: {question}\nN: {memory}\nT: {chunk}\nNotes?",
    final_answer="Q: {question}\nN: {memory}\nAnswer in \\boxed{}.",
    initial_memory="none",
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(exported folder with memagent_agent.json, the same weights without it, the templates file)."""
    root = tmp_path_factory.mktemp("settings")
    plain = make_agent_model_dir(root / "plain", variant="qwen2", seed=3)
    exported = str(root / "exported")
    shutil.copytree(plain, exported)
    write_agent_settings(exported, budgets=BUDGETS, templates=TEMPLATES, temperature=0.0, top_p=1.0)
    templates = root / "templates.json"
    templates.write_text(
        json.dumps(
            {
                "memory_update": TEMPLATES.memory_update,
                "final_answer": TEMPLATES.final_answer,
                "initial_memory": TEMPLATES.initial_memory,
            }
        )
    )
    return exported, plain, str(templates)


def test_round_trip_and_defaults(tmp_path):
    settings = AgentSettings(
        budgets=BUDGETS,
        templates=TEMPLATES.replace(prompt_mode="text"),
        temperature=0.7,
        top_p=0.95,
        reward_style="reference_boxed",
        training={"steps": 3},
    )
    path = settings.save(tmp_path)
    assert os.path.basename(path) == SETTINGS_FILE
    back = AgentSettings.load(tmp_path)
    assert back.budgets == BUDGETS and back.templates == settings.templates and back.path == path
    assert (back.temperature, back.top_p, back.reward_style, back.training) == (
        0.7,
        0.95,
        "reference_boxed",
        {"steps": 3},
    )
    plain = AgentSettings.load(tmp_path / "nothing_here")  # no file: the documented defaults
    assert plain.budgets == AgentBudgets() and plain.templates == AgentTemplates() and plain.temperature is None
    assert plain.sampling().temperature == 0.0 and plain.sampling(0.7, 0.95).top_p == 0.95
    over = back.override(chunk_tokens=64, memory_update="{question}{memory}{chunk}", temperature=0.0, top_p=None)
    assert over.budgets.chunk_tokens == 64 and over.budgets.memory_tokens == 16
    assert over.templates.memory_update == "{question}{memory}{chunk}" and over.temperature == 0.0
    assert over.top_p == 0.95  # None = keep
    with pytest.raises(TypeError, match="unknown agent setting.*'chunk_size'"):
        back.override(chunk_size=3)


def test_top_k_round_trips_and_older_files_load(tmp_path):
    path = AgentSettings(budgets=BUDGETS, temperature=1.0, top_k=5).save(tmp_path)
    assert json.loads(open(path).read())["agent"]["top_k"] == 5
    back = AgentSettings.load(tmp_path)
    assert back.top_k == 5 and back.sampling().top_k == 5 and back.sampling().temperature == 1.0
    assert back.override(top_k=0).sampling().top_k == 0 and back.override(top_k=None).top_k == 5
    # A file written before top_k was a setting: it loads, with no top-k filter.
    data = json.loads(open(path).read())
    del data["agent"]["top_k"]
    (tmp_path / SETTINGS_FILE).write_text(json.dumps(data))
    old = AgentSettings.load(tmp_path)
    assert old.top_k is None and old.sampling().top_k == 0 and old.budgets == BUDGETS
    with pytest.raises(ValueError, match="top_k must be an integer >= 0"):
        AgentSettings(top_k=-2)
    # write_agent_settings (the exports) records it too.
    write_agent_settings(tmp_path, budgets=BUDGETS, templates=TEMPLATES, top_k=3)
    assert AgentSettings.load(tmp_path).top_k == 3


@pytest.mark.parametrize(
    "change, message",
    [
        ({"agent": {"chunk_tokens": 0}}, r"agent\.chunk_tokens must be an integer > 0, got 0"),
        ({"agent": {"chunk_tokens": True}}, r"agent\.chunk_tokens must be an integer > 0, got True"),
        ({"agent": {"temperature": float("nan")}}, r"agent\.temperature must be a finite number >= 0 \(0 = greedy\)"),
        ({"agent": {"chunk_size": 5}}, r"unknown field\(s\) agent\.\['chunk_size'\]"),
        ({"agent": {"top_p": 2}}, r"agent\.top_p must be a finite number in \(0, 1\]"),
        ({"agent": {"top_k": -1}}, r"agent\.top_k must be an integer >= 0 \(0 = off\), got -1"),
        ({"agent": {"top_k": 2.5}}, r"agent\.top_k must be an integer >= 0 \(0 = off\), got 2\.5"),
        ({"templates": {"memory_update": "no placeholders"}}, r"field templates: "),
        ({"templates": {"system": 3}}, r"field templates\.system has the wrong type"),
        ({"version": 9}, r"field 'version' is 9"),
    ],
)
def test_bad_files_name_the_file_and_field(tmp_path, change, message):
    data = AgentSettings(budgets=BUDGETS).to_dict()
    for key, value in change.items():
        data[key] = dict(data[key], **value) if isinstance(value, dict) else value
    (tmp_path / SETTINGS_FILE).write_text(json.dumps(data))
    with pytest.raises(AgentSettingsError, match=message) as e:
        AgentSettings.load(tmp_path)
    assert SETTINGS_FILE in str(e.value)
    (tmp_path / SETTINGS_FILE).write_text("{not json")
    with pytest.raises(AgentSettingsError, match="not valid JSON"):
        AgentSettings.load(tmp_path)


def _answer(argv, capsys):
    assert answer.main(argv + ["--no-progress"]) == 0
    out, _ = capsys.readouterr()
    return out


def test_answer_uses_the_export_settings_and_flags_override(folders, tmp_path, capsys):
    exported, plain, templates = folders
    doc = tmp_path / "doc.txt"
    doc.write_text("The red key is under the third stone. The blue door is open. " * 8, encoding="utf-8")
    single = ["--question", "Where is the key?", "--document", str(doc), "--trace"]
    explicit = [
        "--agent.question_tokens",
        "32",
        "--agent.chunk_tokens",
        "24",
        "--agent.memory_tokens",
        "16",
        "--agent.answer_tokens",
        "6",
        "--agent.chunks_per_segment",
        "2",
        "--agent.templates",
        templates,
        "--agent.temperature",
        "0",
    ]
    from_file = _answer(["--model", exported] + single, capsys)
    by_hand = _answer(["--model", plain] + single + explicit, capsys)
    assert from_file == by_hand and from_file.count("--- memory after chunk") >= 3
    # A flag beats the file: other budgets, another trace (fewer chunks of a larger size).
    bigger = _answer(["--model", exported, "--agent.chunk_tokens", "48"] + single, capsys)
    assert bigger.count("--- memory after chunk") < from_file.count("--- memory after chunk")
    # The old spellings are gone: argparse refuses them (exit 2) instead of running with another setting.
    with pytest.raises(SystemExit) as exit_info:
        answer.main(["--model", exported, "--chunk-tokens", "48", "--no-progress"] + single)
    assert exit_info.value.code == 2 and "unrecognized arguments: --chunk-tokens" in capsys.readouterr().err


def test_from_pretrained_reads_the_settings(folders):
    exported, plain, _ = folders
    agent = MemoryAgent.from_pretrained(exported)
    assert agent.budgets == BUDGETS and agent.templates == TEMPLATES and agent.settings.path.endswith(SETTINGS_FILE)
    doc = "The red key is under the third stone. " * 10
    by_hand = MemoryAgent.from_pretrained(plain, budgets=BUDGETS, templates=TEMPLATES, temperature=0.0)
    a = agent.run(["Where is the key?"], [doc], rng=0, trace=True)
    b = by_hand.run(["Where is the key?"], [doc], rng=0, trace=True)
    assert a.answers == b.answers and a.traces == b.traces
    np.testing.assert_array_equal(np.asarray(a.num_chunks), np.asarray(b.num_chunks))
    other = MemoryAgent.from_pretrained(exported, chunk_tokens=48, initial_memory="empty")
    assert other.budgets.chunk_tokens == 48 and other.budgets.memory_tokens == 16
    assert other.templates.initial_memory == "empty"
    assert (
        MemoryAgent.from_pretrained(
            plain, chunk_tokens=24, question_tokens=32, memory_tokens=16, answer_tokens=6
        ).templates
        == AgentTemplates()
    )  # plain folder: defaults


def test_evaluate_uses_each_models_settings(folders, tmp_path):
    from memagent_jax import evaluation as ev
    from memagent_jax.data.formats import write_eval_file
    from memagent_jax.data.records import QARecord

    exported, plain, templates = folders
    path = str(tmp_path / "qa.jsonl")
    write_eval_file(
        [QARecord(question="Where is the key?", document="The key is in the box. " * 12, answers=("box",), index=0)],
        path,
    )
    common = dict(progress=False, plot=False, warmup=False)
    a = ev.evaluate_models({"exported": exported}, [path], None, **common)
    b = ev.evaluate_models(
        {"plain": plain}, [path], None, budgets=BUDGETS, templates=templates, temperature=0.0, top_p=1.0, **common
    )
    assert [r["response"] for r in a.results[0].rows] == [r["response"] for r in b.results[0].rows]
    agents = a.config["agents"]["exported"]
    assert agents["settings_file"].endswith(SETTINGS_FILE) and agents["agent"]["chunk_tokens"] == 24
    assert agents["memory_sampling"]["temperature"] == 0.0
    # An explicit setting beats the file; a plain folder gets the evaluation recipe's sampling.
    c = ev.evaluate_models({"exported": exported}, [path], None, agent_overrides={"chunk_tokens": 48}, **common)
    assert c.config["agents"]["exported"]["agent"]["chunk_tokens"] == 48
    assert c.results[0].rows[0]["num_chunks"] < a.results[0].rows[0]["num_chunks"]
    assert b.config["agents"]["plain"]["settings_file"] is None


def test_generate_samples_as_the_settings_say(folders, tmp_path, capsys):
    from memagent_jax import generate

    exported, plain, _ = folders
    hot = str(tmp_path / "hot")
    shutil.copytree(plain, hot)
    write_agent_settings(hot, budgets=BUDGETS, templates=TEMPLATES, temperature=5.0, top_p=1.0)
    base = ["--prompt", "The red key", "--max-new-tokens", "12", "--json", "--quiet", "--seed", "3"]

    def run(argv):
        assert generate.main(argv) == 0
        return json.loads(capsys.readouterr().out)["token_ids"]

    from_file = run(["--model", hot] + base)
    assert from_file == run(["--model", plain, "--temperature", "5", "--top-p", "1"] + base)
    greedy = run(["--model", plain] + base)
    assert from_file != greedy  # the file's temperature 5 really samples
    assert run(["--model", hot, "--temperature", "0"] + base) == greedy  # a flag beats the file

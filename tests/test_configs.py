"""The shipped recipes: one set of CPU agent settings (budgets and wording) named the same everywhere, override
blocks that change only what they name, and a package importable from anywhere without JAX."""

import importlib
import os
import subprocess
import sys

import pytest

from memagent_jax import configs
from memagent_jax.configs import cpu_agent

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _config(name: str, arg: str = ""):
    return importlib.import_module(f"memagent_jax.configs.{name}").get_config(arg)


BUDGETS = ("question_tokens", "chunk_tokens", "memory_tokens", "answer_tokens")
WORDING = ("memory_update", "final_answer", "initial_memory")


def test_cpu_variants_carry_the_main_jobs_budgets_and_wording():
    job = _config("tiny_synthetic")
    variants = {"grpo:cpu": _config("grpo", "cpu"), "evaluate:cpu": _config("evaluate", "cpu")}
    for name, cfg in variants.items():
        for field in BUDGETS:
            assert cfg.agent[field] == job.agent[field], (name, field)
    for field in WORDING:  # train's cpu variant writes the job's wording; evaluate keeps each model's own
        assert variants["grpo:cpu"].agent[field] == job.agent[field], field
        assert variants["evaluate:cpu"].agent[field] == "", field
    assert [job.agent[f] for f in BUDGETS] == [16, 32, 8, 12]
    assert job.agent.memory_update == cpu_agent.MEMORY_UPDATE
    # the cpu variant's own task fits its budgets: keyed_recall over two chunks
    grpo = variants["grpo:cpu"]
    assert (grpo.data.synthetic_task, grpo.data.synthetic_tokens) == ("keyed_recall", 2 * job.agent.chunk_tokens)


def test_loading_the_configs_imports_no_jax(tmp_path):
    # From a folder that is not the checkout: the recipes are a package, and they import each other.
    code = (
        "import sys\n"
        "from memagent_jax.configs import grpo, evaluate, tiny_synthetic, qwen2_5_7b_hotpotqa\n"
        "for m in (grpo, evaluate, tiny_synthetic, qwen2_5_7b_hotpotqa):\n"
        "    m.get_config()\n"
        "assert not any(m == 'jax' or m.startswith('jax.') for m in sys.modules), 'jax imported'"
    )
    subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=os.path.abspath(REPO)), check=True
    )


def test_cpu_block_changes_only_what_it_names():
    reference, cpu = _config("grpo").to_dict(), _config("grpo", "cpu").to_dict()
    changed = {
        f"{section}.{field}"
        for section, fields in reference.items()
        if isinstance(fields, dict)
        for field in fields
        if fields[field] != cpu[section][field]
    }
    changed |= {name for name, value in reference.items() if not isinstance(value, dict) and value != cpu[name]}
    assert changed == {
        "steps",
        "model.param_dtype",
        "model.compute_dtype",
        "model.remat",
        "data.synthetic_task",
        "data.synthetic_tokens",
        "data.synthetic_samples",
        "data.reward_style",
        "agent.question_tokens",
        "agent.chunk_tokens",
        "agent.memory_tokens",
        "agent.answer_tokens",
        "agent.chunks_per_segment",
        "agent.memory_update",
        "agent.final_answer",
        "agent.initial_memory",
        "agent.max_document_tokens",
        "rl.questions_per_step",
        "rl.group_size",
        "rl.num_minibatches",
        "rl.warmup_steps",
        "rl.warmup_from_zero",
        "rl.kl_clamp",
        "rl.length_multiple",
        "rl.recompute_old_logprobs",
        "checkpoint.every",
    }


@pytest.mark.parametrize("name", ["grpo", "evaluate", "tiny_synthetic"])
def test_unknown_variant_is_an_error_naming_the_known_ones(name):
    with pytest.raises(ValueError, match="unknown variant 'gpu'; known"):
        _config(name, "gpu")


def test_config_paths_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = configs.path_of("grpo.py:cpu")
    assert shipped.endswith(":cpu") and os.path.isfile(shipped.rsplit(":", 1)[0])
    assert configs.resolve("configs/grpo.py:cpu") == shipped  # no configs/ here: the shipped recipe
    local = tmp_path / "mine.py"
    local.write_text("")
    assert configs.resolve(f"{local}:x") == f"{local}:x"  # a file that exists is used as given
    assert configs.resolve_argv(["--config", "configs/evaluate.py", "--workdir", "w"])[1] == configs.path_of("evaluate")
    assert configs.resolve_argv(["--config=configs/models.py:tiny"]) == ["--config=" + configs.path_of("models:tiny")]
    with pytest.raises(FileNotFoundError, match="no shipped config 'nope'; known: .*grpo"):
        configs.path_of("nope")


def test_reference_variants_leave_the_wording_to_the_templates():
    for cfg in (_config("grpo"), _config("evaluate")):
        assert all(cfg.agent[field] == "" for field in WORDING)


def test_train_reads_single_template_fields_over_the_file(tmp_path):
    from memagent_jax.rl.recipe import agent_settings

    cfg = _config("grpo", "cpu")
    budgets, templates = agent_settings(cfg)
    assert (budgets.question_tokens, budgets.chunk_tokens, budgets.memory_tokens, budgets.answer_tokens) == (
        16,
        32,
        8,
        12,
    )
    assert (templates.memory_update, templates.final_answer, templates.initial_memory) == (
        cpu_agent.MEMORY_UPDATE,
        cpu_agent.FINAL_ANSWER,
        cpu_agent.INITIAL_MEMORY,
    )
    file = tmp_path / "t.json"
    file.write_text('{"initial_memory": "Empty.", "final_answer": "Q: {question} N: {memory} Answer."}')
    cfg.agent.templates = str(file)
    cfg.agent.final_answer = ""  # '' = the file's
    _, templates = agent_settings(cfg)
    assert templates.final_answer == "Q: {question} N: {memory} Answer."
    assert templates.initial_memory == cpu_agent.INITIAL_MEMORY  # the single field wins over the file

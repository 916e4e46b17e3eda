"""The config variants agree on one set of CPU agent settings (budgets and wording), named the same everywhere."""

import importlib.util
import os
import subprocess
import sys

from memagent_jax.agent import cpu_settings

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _config(name: str, arg: str = ""):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


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
    assert job.agent.memory_update == cpu_settings.MEMORY_UPDATE
    # the cpu variant's own task fits its budgets: keyed_recall over two chunks
    grpo = variants["grpo:cpu"]
    assert (grpo.data.synthetic_task, grpo.data.synthetic_tokens) == ("keyed_recall", 2 * job.agent.chunk_tokens)


def test_loading_the_configs_imports_no_jax():
    # The configs import agent.cpu_settings (plain values): the agent package loads its JAX modules lazily.
    code = ("import importlib.util, sys\n"
            "for name in ('tiny_synthetic', 'grpo', 'evaluate'):\n"
            "    spec = importlib.util.spec_from_file_location(name, f'configs/{name}.py')\n"
            "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            "assert not any(m == 'jax' or m.startswith('jax.') for m in sys.modules), 'jax imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), check=True)


def test_reference_variants_leave_the_wording_to_the_templates():
    for cfg in (_config("grpo"), _config("evaluate")):
        assert all(cfg.agent[field] == "" for field in WORDING)


def test_train_reads_single_template_fields_over_the_file(tmp_path):
    from memagent_jax.train import agent_settings

    cfg = _config("grpo", "cpu")
    budgets, templates = agent_settings(cfg)
    assert (budgets.question_tokens, budgets.chunk_tokens, budgets.memory_tokens, budgets.answer_tokens) == (
        16, 32, 8, 12)
    assert (templates.memory_update, templates.final_answer, templates.initial_memory) == (
        cpu_settings.MEMORY_UPDATE, cpu_settings.FINAL_ANSWER, cpu_settings.INITIAL_MEMORY)
    file = tmp_path / "t.json"
    file.write_text('{"initial_memory": "Empty.", "final_answer": "Q: {question} N: {memory} Answer."}')
    cfg.agent.templates = str(file)
    cfg.agent.final_answer = ""  # '' = the file's
    _, templates = agent_settings(cfg)
    assert templates.final_answer == "Q: {question} N: {memory} Answer."
    assert templates.initial_memory == cpu_settings.INITIAL_MEMORY  # the single field wins over the file

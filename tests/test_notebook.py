"""examples/quickstart.ipynb: stored clean, its code valid and calling only public names, and (slow) run end to end
in a fresh kernel of this interpreter, printing what its cells say they print.
"""

import ast
import importlib
import json
import os
import re
import sys

import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "examples", "quickstart.ipynb")


def _notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def _code_cells(nb) -> dict[str, str]:
    return {cell.id: cell.source for cell in nb.cells if cell.cell_type == "code"}


def test_notebook_is_stored_without_outputs():
    nb = _notebook()
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {cell.id!r} is stored with outputs: clear them before committing"
            assert cell.execution_count is None, f"cell {cell.id!r} is stored with an execution count"
    assert nb.metadata.kernelspec.name == "python3"


def _memagent_names(tree: ast.Module, scope: dict) -> list[tuple[str, str]]:
    """(module, name) for every name the code takes from memagent_jax: `from memagent_jax... import name`, and
    `alias.name` where `alias` was bound to a memagent_jax module in this cell or an earlier one (`scope`)."""
    used = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "memagent_jax":
            for alias in node.names:
                used.append((node.module, alias.name))
                scope[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "memagent_jax":
                    scope[alias.asname or alias.name] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in scope:
            used.append((scope[node.value.id], node.attr))
    return used


def _resolve(dotted: str):
    """The object a dotted name stands for: its longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)  # AttributeError names a missing function or class
        return obj
    raise ModuleNotFoundError(dotted)


def test_notebook_code_is_python_that_uses_only_public_names():
    """Every code cell parses (no shell escapes or magics), and every name it takes from memagent_jax exists and is
    public: a renamed or privatised library function fails here, without running the notebook."""
    scope: dict = {}
    checked = set()
    for cell_id, source in _code_cells(_notebook()).items():
        assert not re.search(r"^\s*[!%]", source, re.M), f"cell {cell_id!r}: shell escapes and magics do not run in CI"
        tree = ast.parse(source, filename=f"quickstart.ipynb#{cell_id}")
        for owner, name in _memagent_names(tree, scope):
            assert not name.startswith("_"), f"cell {cell_id!r} uses the private name {owner}.{name}"
            assert _resolve(f"{owner}.{name}") is not None
            checked.add(f"{owner}.{name}")
    # The stages the notebook runs, so that the check above has looked at them.
    assert {"memagent_jax.pipeline.make_assets", "memagent_jax.pipeline.reinforce"} <= checked


def _kernel_manager(tmp_path):
    """A kernel manager for a kernel spec written under tmp_path: this interpreter running ipykernel, importing
    memagent_jax from this checkout. Needs no installed `python3` spec (the notebook's metadata names that one)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    name = "memagent-notebook-test"
    folder = tmp_path / "kernels" / name
    folder.mkdir(parents=True)
    pythonpath = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "memagent-jax test",
        "language": "python",
        "env": {"PYTHONPATH": pythonpath, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"},
    }
    (folder / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name=name, kernel_spec_manager=specs)


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


@pytest.mark.slow
def test_notebook_runs_end_to_end(tmp_path):
    from nbclient import NotebookClient

    nb = _notebook()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    client = NotebookClient(
        nb, km=_kernel_manager(tmp_path), timeout=600, resources={"metadata": {"path": str(run_dir)}}
    )
    # Raises CellExecutionError, naming the cell, on the first error; cleanup_kc: shut the kernel down afterwards
    # (nbclient leaves a kernel it was handed running).
    client.execute(cleanup_kc=True)
    cells = {cell.id: cell for cell in nb.cells if cell.cell_type == "code"}
    for cell_id, cell in cells.items():
        assert not [o for o in cell.outputs if o.output_type == "error"], cell_id

    workdir = re.search(r"artefacts go to (\S+)", _stdout(cells["setup"])).group(1)
    assert "Remember " in _stdout(cells["assets"])  # the task's facts, in its wording
    assert "[warm start] done" in _stdout(cells["warm"]) and "[rl] done" in _stdout(cells["rl"])
    eval_out = _stdout(cells["eval"])
    for model in ("warm_start", "RL"):
        assert re.search(rf"^{model}\s+eval_4x\s", eval_out, re.M), eval_out  # a row of the results table
    assert "'predictions'" in eval_out and "'results.csv'" in eval_out

    # The trace cell: one memory per chunk of a 4x document (8 chunks), and the memory is text the warm start taught
    # (notes naming the asked creature), not an empty string.
    trace_out = _stdout(cells["trace"])
    creature = re.search(r"What is the secret word for (\w+)\?", trace_out).group(1)
    memories = re.findall(r"^memory after chunk (\d+): (.*)$", trace_out, re.M)
    assert [int(step) for step, _ in memories] == list(range(1, 9)), trace_out
    assert any(creature in text for _, text in memories), trace_out

    api_out = _stdout(cells["api"])
    assert re.search(r"^answer: (None|'.*'|\".*\") \(gold '\w+'; raw response .+\)$", api_out, re.M), api_out
    assert "8 chunks read" in api_out
    report = "".join(
        o.data.get("text/markdown", "") for o in cells["report"].outputs if o.output_type == "display_data"
    )
    assert "One held-out question, chunk by chunk" in report and "What is the secret word for" in report

    assert f"removed {workdir}" in _stdout(cells["cleanup"]) and not os.path.exists(workdir)
    assert os.listdir(run_dir) == []  # nothing written to the working directory

"""Recipes as ml_collections configs: `get_config(arg)` in each module, `arg` selecting an override block.

    python -m memagent_jax.train --config configs/grpo.py:cpu --workdir runs/x --config.rl.group_size=8

The package ships with the wheel, so a recipe can be named by its path inside a checkout (`configs/grpo.py`, a link
to this folder) or resolved from anywhere with `path_of("grpo")`. Recipes import each other as ordinary modules
(`from memagent_jax.configs import grpo`), and importing one pulls in no JAX.

    grpo                  the reference GRPO recipe; `:cpu` the CPU block (main job's budgets, tiny models, tests)
    evaluate              the reference evaluation recipe; `:cpu` the main job's budgets
    tiny_synthetic        the main job (pipeline); `:quick` shrinks every stage (a pipeline check)
    models                model presets (shapes only)
    qwen*_hotpotqa        the reference recipe at scale on named hardware (`:v5p-128`, `:32xh100`, ...)
    cpu_agent             the budgets and compact wording every CPU block shares (plain values)
"""

from __future__ import annotations

import os
from collections.abc import Callable

FOLDER = os.path.dirname(os.path.abspath(__file__))


def variant(recipe: str, arg: str, base: Callable, blocks: dict[str, Callable], *, base_name: str):
    """`base()` with the override block `blocks[arg]` applied in place ('' = the base alone).

    recipe: the file's name, for the error; base_name: what '' means there. An unknown `arg` is a ValueError naming
    the known variants.
    """
    if arg and arg not in blocks:
        known = ", ".join([f"'' ({base_name})"] + [repr(name) for name in blocks])
        raise ValueError(f"configs/{recipe}.py: unknown variant {arg!r}; known: {known}")
    c = base()
    if arg:
        blocks[arg](c)
    return c


def path_of(name: str) -> str:
    """Absolute path of the recipe `name` ('grpo', 'grpo.py' or 'grpo.py:cpu'; the ':arg' tail is kept)."""
    base, sep, arg = name.partition(":")
    base = os.path.basename(base)
    if not base.endswith(".py"):
        base += ".py"
    path = os.path.join(FOLDER, base)
    if not os.path.isfile(path):
        known = sorted(f[:-3] for f in os.listdir(FOLDER) if f.endswith(".py") and not f.startswith("_"))
        raise FileNotFoundError(f"no shipped config {name!r}; known: {', '.join(known)}")
    return path + sep + arg


def resolve(path: str) -> str:
    """A --config value as given when its file exists, else the shipped recipe of the same file name.

    So `--config configs/grpo.py:cpu` works from any folder, not only a checkout's root.
    """
    file, sep, arg = path.partition(":")
    if os.path.isfile(file) or os.path.basename(os.path.dirname(os.path.normpath(file))) != "configs":
        return path
    return path_of(os.path.basename(file) + sep + arg)


def resolve_argv(argv: list[str]) -> list[str]:
    """`argv` with the value of its --config flag (`--config X` or `--config=X`) passed through `resolve`."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve(arg[len("--config=") :])
    return out

"""The task registry: task name -> :class:`~.task.SyntheticTask`.

The built-in tasks (:data:`TASKS`, in this order) are registered on import.  :func:`register_task` adds more;
a registered task works everywhere a built-in one does (:class:`~.config.SyntheticConfig`,
:func:`~.dataset.generate_sample`, :class:`~.dataset.SyntheticDataset`), but :func:`~.corpus.tokenizer_corpus`
covers the built-in tasks only.
"""

from __future__ import annotations

from . import keyed_recall, multihop_qa, niah, variable_tracking
from .task import SyntheticTask

__all__ = ["TASKS", "BUILTIN_TASKS", "register_task", "get_task", "task_names"]

_REGISTRY: dict[str, SyntheticTask] = {}


def register_task(task: SyntheticTask, *, replace: bool = False) -> SyntheticTask:
    """Register ``task`` under ``task.name`` and return it.

    Raises ValueError if the name is taken (unless ``replace``) or is not a non-empty string.
    """
    if not isinstance(task, SyntheticTask):
        raise TypeError(f"register_task needs a SyntheticTask, got {type(task).__name__}")
    if not isinstance(task.name, str) or not task.name:
        raise ValueError(f"a task name must be a non-empty string, got {task.name!r}")
    if task.name in _REGISTRY and not replace:
        raise ValueError(f"a synthetic task named {task.name!r} is already registered (pass replace=True)")
    _REGISTRY[task.name] = task
    return task


def get_task(name: str) -> SyntheticTask:
    """The registered task called ``name``; ValueError naming every known task if there is none."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown synthetic task {name!r}; known tasks: {', '.join(_REGISTRY)}") from None


def task_names() -> tuple[str, ...]:
    """Names of every registered task, built-in ones first, in registration order."""
    return tuple(_REGISTRY)


BUILTIN_TASKS: tuple[SyntheticTask, ...] = (*niah.TASKS, keyed_recall.TASK, variable_tracking.TASK, multihop_qa.TASK)
for _task in BUILTIN_TASKS:
    register_task(_task)
del _task

# Names of the built-in tasks.
TASKS: tuple[str, ...] = tuple(t.name for t in BUILTIN_TASKS)

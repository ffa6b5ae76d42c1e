"""Tasks as plug-ins: `get(name)` returns the task `conf/task/` chose.

A task is imported only when asked for, so a pipeline that trains text never imports
another task's dependencies.
"""

from __future__ import annotations

from importlib import import_module

from omegaconf import DictConfig

from serving.bundle.tasks import DEFAULT_TASK

# task name -> "module:class" of its Task
TASKS = {
    "text_classification": "pipeline.tasks.text_classification.task:TextClassification",
    "image_classification": "pipeline.tasks.image_classification.task:ImageClassification",
    "next_word": "pipeline.tasks.next_word.task:NextWord",
}


class UnknownTask(ValueError):
    """task.name names no task."""


def get(name: str):
    """The Task called `name` (pipeline/tasks/base.py)."""
    if name not in TASKS:
        raise UnknownTask(f"task.name: unknown task {name!r} ({', '.join(sorted(TASKS))})")
    module, cls = TASKS[name].split(":")
    return getattr(import_module(module), cls)()


def from_config(cfg: DictConfig):
    """The task the composed configuration chose (text classification when it names
    none, as params.yaml files written before tasks existed do)."""
    return get(cfg.get("task", {}).get("name", DEFAULT_TASK))

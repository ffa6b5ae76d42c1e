"""The search space of `tune`, declared in conf/tune/ rather than in code.

Each entry of `tune.space` is keyed by the Hydra override it sets:

    model: {choices: [lstm, transformer]}              # a config group: conf/model/*.yaml
    train.lr: {low: 3.0e-4, high: 3.0e-3, log: true}   # float, log-uniform
    model.dropout: {low: 0.0, high: 0.3}               # float, uniform
    train.batch_size: {choices: [32, 64, 128]}         # categorical
    model.num_layers: {low: 1, high: 3, int: true}     # integer (`step` too)

A trial's values become overrides (`model=lstm train.lr=0.0012 ...`); the best trial's
become `conf/experiment/tuned.yaml`. The Optuna parameter names are the override keys,
so a study's parameters read the same as the configuration they set.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

CHOICE_FIELDS = {"choices"}
RANGE_FIELDS = {"low", "high", "log", "step", "int"}
# A string Hydra reads back unchanged without quotes (a config name, a plain word).
PLAIN = re.compile(r"[A-Za-z_][\w./-]*")
ABSENT = object()


class SpaceError(ValueError):
    """A `tune.space` entry that cannot be searched; the message names the entry."""


@dataclass(frozen=True)
class Dimension:
    """One entry of the space: the override `key` and the values it may take."""

    key: str
    choices: tuple = ()
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    integer: bool = False
    group: bool = False  # `key` names a config group (conf/<key>/), not a value

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1,
                                     log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step,
                                   log=self.log)


def is_group(key: str, conf_dir: Path) -> bool:
    return (Path(conf_dir) / key).is_dir()


def parse_space(space: DictConfig | Mapping, conf_dir: Path) -> list[Dimension]:
    """The dimensions of `space` (`tune.space`); SpaceError names the first bad entry.
    An entry set to null is left out, so the command line can drop one."""
    entries = OmegaConf.to_container(space, resolve=True) if isinstance(space, DictConfig) \
        else dict(space)
    dimensions = [dimension(key, spec, conf_dir) for key, spec in entries.items()
                  if spec is not None]
    if not dimensions:
        raise SpaceError("tune.space: empty; nothing to search")
    return dimensions


def dimension(key: str, spec: Any, conf_dir: Path) -> Dimension:
    name = f"tune.space.{key}"
    if not isinstance(spec, Mapping):
        raise SpaceError(f"{name}: expected a mapping such as {{choices: [...]}} or "
                         f"{{low: ..., high: ...}}, got {spec!r}")
    fields = set(spec)
    unknown = fields - CHOICE_FIELDS - RANGE_FIELDS
    if unknown:
        raise SpaceError(f"{name}: unknown field(s) {sorted(unknown)}; expected `choices`, "
                         "or `low`, `high` and optionally `log`, `step`, `int`")
    if "choices" in fields:
        if fields != CHOICE_FIELDS:
            raise SpaceError(f"{name}: `choices` cannot be combined with "
                             f"{sorted(fields - CHOICE_FIELDS)}")
        return categorical(name, key, spec["choices"], conf_dir)
    if not {"low", "high"} <= fields:
        raise SpaceError(f"{name}: needs `choices`, or both `low` and `high`")
    return numeric(name, key, spec)


def categorical(name: str, key: str, choices: Any, conf_dir: Path) -> Dimension:
    if not isinstance(choices, list) or not choices:
        raise SpaceError(f"{name}: choices must be a non-empty list, got {choices!r}")
    if any(isinstance(c, (list, dict)) for c in choices):
        raise SpaceError(f"{name}: choices must be single values, got {choices!r}")
    if len(set(map(repr, choices))) != len(choices):
        raise SpaceError(f"{name}: choices repeat a value: {choices!r}")
    group = is_group(key, conf_dir)
    if group:
        available = sorted(p.stem for p in (Path(conf_dir) / key).glob("*.yaml"))
        missing = [c for c in choices if str(c) not in available]
        if missing:
            raise SpaceError(f"{name}: {missing} not in conf/{key}/ (one of "
                             f"{', '.join(available)})")
    return Dimension(key, choices=tuple(choices), group=group)


def numeric(name: str, key: str, spec: Mapping) -> Dimension:
    low, high, step = spec["low"], spec["high"], spec.get("step")
    log, integer = spec.get("log", False), spec.get("int", False)
    for field, value in (("log", log), ("int", integer)):
        if not isinstance(value, bool):
            raise SpaceError(f"{name}: {field} must be true or false, got {value!r}")
    for field, value in (("low", low), ("high", high), ("step", step)):
        if value is not None and (isinstance(value, bool)
                                  or not isinstance(value, (int, float))):
            raise SpaceError(f"{name}: {field} must be a number, got {value!r}")
        if integer and value is not None and not isinstance(value, int):
            raise SpaceError(f"{name}: {field} must be an integer (int: true), got {value!r}")
    if not low < high:
        raise SpaceError(f"{name}: low must be < high (got low={low}, high={high})")
    if log and low <= 0:
        raise SpaceError(f"{name}: log needs low > 0 (got low={low})")
    if step is not None and step <= 0:
        raise SpaceError(f"{name}: step must be > 0 (got step={step})")
    if log and step is not None and not (integer and step == 1):
        raise SpaceError(f"{name}: log and step cannot be combined (Optuna samples a "
                         "log scale continuously)")
    return Dimension(key, low=low, high=high, log=log, step=step, integer=integer)


def check_against_conf(space: list[Dimension], overrides: list[str],
                       compose: Callable[[list[str]], DictConfig]) -> None:
    """Every value entry must exist in the configuration of every group choice: a
    `model.num_layers` entry with `model: {choices: [lstm, transformer]}` would fail the
    first Transformer trial (it has no num_layers), so fail here instead."""
    values = [d for d in space if not d.group]
    variants = [[f"{d.key}={c}"] for d in space if d.group for c in d.choices] or [[]]
    for variant in variants:
        cfg = compose([*overrides, *variant])
        for d in values:
            if OmegaConf.select(cfg, d.key, default=ABSENT) is ABSENT:
                where = " with " + " ".join(variant) if variant else ""
                raise SpaceError(f"tune.space.{d.key}: the configuration{where} has no "
                                 f"`{d.key}` to set")


def hydra_value(value: Any) -> str:
    """`value` as a Hydra override writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str) and not PLAIN.fullmatch(value):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def trial_overrides(space: list[Dimension], trial: optuna.Trial) -> list[str]:
    """The trial's choices as Hydra overrides."""
    return [f"{d.key}={hydra_value(d.suggest(trial))}" for d in space]


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def tuned_experiment(params: dict[str, Any], conf_dir: Path, note: list[str]) -> str:
    """An experiment file (`experiment=tuned`) that sets the best trial's `params`:
    config groups through the defaults list, values as nested keys."""
    groups = {k: v for k, v in params.items() if is_group(k, conf_dir)}
    values = OmegaConf.create({})
    for key, value in params.items():
        if key not in groups:
            OmegaConf.update(values, key, value, force_add=True)
    lines = ["# @package _global_", *(f"# {line}" for line in note)]
    if groups:
        lines += ["defaults:", *(f"  - override /{k}: {v}" for k, v in groups.items())]
    return "\n".join(lines) + "\n" + (OmegaConf.to_yaml(values) if values else "")

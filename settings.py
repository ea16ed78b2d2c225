"""Each setting's legal values and its help, declared once: on the field of its config dataclass.

What it does: `setting(default, help, ge=…, gt=…, le=…, lt=…, choices=…)` is a dataclasses.field whose
metadata holds the setting's help and its legal values (the bounds read as in `value >= ge`, and so on);
`same_as` declares a setting one config forwards to another (rl.RLConfig's rollout settings are
rollout.RolloutConfig's) without restating it. `check(config)` refuses a config holding a value outside
its field's legal values, naming the field and the range:

    ValueError: RLConfig.lr=2.0: must be in [0, 1]

`problem` and `range_text` say the same of one value, for the command line: cli.py makes every
--option of a config from these fields (its --help shows the help, the range and the default; its
parser refuses what `problem` refuses). Every number must also be finite (`--lr inf` would only fail
steps later, in sampling). None is legal exactly where it is the field's default: it means "not set".

What it does not do: define a config (each lives beside the code it configures: rollout.RolloutConfig,
sft.SupervisedConfig, rl.RLConfig), parse a command line (cli.py), or check settings that are legal
alone but not together (rl.check_rl_settings, the trainers). Standard library only, so the lowest
modules (rollout.py) can declare their settings with it.

    @dataclass
    class Config:
        lr: float = settings.setting(1e-6, "peak learning rate", ge=0, le=1)
        algo: str = settings.setting("grpo", "the update", choices=("grpo", "ppo"))
    settings.check(Config(lr=2.0))        # ValueError: Config.lr=2.0: must be in [0, 1]
"""
from __future__ import annotations

import dataclasses
import math
import operator

# metadata key -> (the comparison a legal value passes, how --help writes it)
BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def setting(default, help: str, *, ge=None, gt=None, le=None, lt=None, choices=None) -> dataclasses.Field:
    """A config field: its default, its help (the one place the setting is explained, in the source
    and in --help alike) and its legal values."""
    legal = {key: bound for key, bound in dict(ge=ge, gt=gt, le=le, lt=lt).items() if bound is not None}
    if choices is not None:
        legal["choices"] = tuple(choices)
    return dataclasses.field(default=default, metadata={"help": help, **legal})


def same_as(config_cls, name: str, help: str | None = None) -> dataclasses.Field:
    """The setting `name` of another config: its default, legal values and (unless `help` says how this
    config uses it) its help."""
    source = next(f for f in dataclasses.fields(config_cls) if f.name == name)
    return dataclasses.field(default=source.default, metadata={**source.metadata, **({"help": help} if help else {})})


def range_text(legal) -> str:
    """The bounds in `legal` (a field's metadata) as --help and errors write them: ">= 1", "> 0",
    "in [0, 1]", "in (0, 1]", "in [0, 1)"; "" when there are none."""
    low = next(((key, legal[key]) for key in ("ge", "gt") if key in legal), None)
    high = next(((key, legal[key]) for key in ("le", "lt") if key in legal), None)
    if low and high:
        return f"in {'[' if low[0] == 'ge' else '('}{low[1]}, {high[1]}{']' if high[0] == 'le' else ')'}"
    if low or high:
        key, bound = low or high
        return f"{BOUNDS[key][1]} {bound}"
    return ""


def problem(legal, value, optional: bool = False) -> str | None:
    """What is wrong with `value` for a setting whose legal values are `legal` (a field's metadata), as
    the rest of a sentence ("must be in [0, 1]"), or None when it is legal. `optional`: None is legal."""
    if "choices" in legal:
        return None if value in legal["choices"] else f"must be one of {legal['choices']}"
    bounds = [(BOUNDS[key][0], bound) for key, bound in legal.items() if key in BOUNDS]
    if not bounds or (value is None and optional):
        return None
    if value is None:
        return f"must be {range_text(legal)}"
    if not math.isfinite(value):
        return f"must be finite and {range_text(legal)}"
    return None if all(passes(value, bound) for passes, bound in bounds) else f"must be {range_text(legal)}"


def check(config) -> None:
    """Refuses a config (a dataclass made of `setting`s) holding any value outside its field's legal
    values: ValueError naming the class, the field, the value and the range."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        wrong = problem(f.metadata, value, optional=f.default is None)
        if wrong:
            raise ValueError(f"{type(config).__name__}.{f.name}={value!r}: {wrong}")

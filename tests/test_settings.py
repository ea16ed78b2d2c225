"""settings.py: a setting's legal values are declared once, on its field, and that one declaration is
what the command line (cli.add_config_args) and the validator (settings.check, RolloutConfig when it
is made) enforce, each naming the setting and its range."""
import dataclasses
import re

import pytest

import cli
import rl
import rollout
import settings
import sft

CONFIGS = (sft.SupervisedConfig, rl.RLConfig, rollout.RolloutConfig)


def every_bound():
    """(config class, field, bound) of every bound of every setting of the configs the stages take."""
    return [(cls, f, key) for cls in CONFIGS for f in dataclasses.fields(cls) for key in settings.BOUNDS
            if key in f.metadata]


def kind_of(f):
    return type(f.default) if f.default is not None else (int if "int" in str(f.type) else float)


def just_outside(f, key):
    """A value one past the bound (an inclusive one ± 1, an exclusive one itself)."""
    return kind_of(f)(f.metadata[key] + {"ge": -1, "gt": 0, "le": 1, "lt": 0}[key])


def just_inside(f, key):
    """The bound itself when it is inclusive, else the nearest legal value of the field's kind beside it."""
    step = {"ge": 0, "gt": 1, "le": 0, "lt": -1}[key] * (0.5 if kind_of(f) is float else 1)
    return kind_of(f)(f.metadata[key] + step)


def parser_of(cls):
    parser = cli.ArgumentParser(prog="x")
    cli.add_config_args(parser, cls)
    return parser


@pytest.mark.parametrize("cls, f, key", every_bound(), ids=lambda x: getattr(x, "__name__", getattr(x, "name", x)))
def test_a_fields_declared_range_is_what_the_command_line_and_the_validator_refuse(cls, f, key, capsys):
    bad, good, legal = just_outside(f, key), just_inside(f, key), settings.range_text(f.metadata)
    flag = "--" + f.name.replace("_", "-")
    with pytest.raises(ValueError, match="^" + re.escape(f"{cls.__name__}.{f.name}={bad!r}: must be {legal}") + "$"):
        settings.check(dataclasses.replace(cls(), **{f.name: bad}))
    with pytest.raises(SystemExit):
        parser_of(cls).parse_args([flag, str(bad)])
    assert f"argument {flag}: must be {legal}, got {bad}" in capsys.readouterr().err
    settings.check(dataclasses.replace(cls(), **{f.name: good}))
    assert getattr(parser_of(cls).parse_args([flag, str(good)]), f.name) == good


def test_every_setting_is_explained_and_every_number_declares_its_legal_values():
    for cls in CONFIGS:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), (cls.__name__, f.name)
            if kind_of(f) in (int, float):
                assert settings.range_text(f.metadata), (cls.__name__, f.name)


def test_range_text_and_problem_by_hand():
    assert [settings.range_text(legal) for legal in (dict(ge=1), dict(gt=0), dict(ge=0, le=1), dict(gt=0, le=1),
                                                      dict(ge=0, lt=1), {})] == \
        [">= 1", "> 0", "in [0, 1]", "in (0, 1]", "in [0, 1)", ""]
    assert settings.problem(dict(ge=0, le=1), 0.5) is None
    assert settings.problem(dict(ge=0, le=1), float("nan")) == "must be finite and in [0, 1]"
    assert settings.problem(dict(ge=0, le=1), float("-inf")) == "must be finite and in [0, 1]"
    assert settings.problem(dict(ge=1), None) == "must be >= 1"
    assert settings.problem(dict(ge=1), None, optional=True) is None
    assert settings.problem(dict(choices=("a", "b")), "c") == "must be one of ('a', 'b')"
    assert settings.problem({"help": "no bounds"}, -5) is None


def test_choices_are_offered_by_the_command_line_and_checked_by_the_validator(capsys):
    with pytest.raises(ValueError, match=r"RLConfig.kl='k4': must be one of \('full', 'k2', 'k3'\)"):
        settings.check(rl.RLConfig(kl="k4"))
    with pytest.raises(SystemExit):
        parser_of(rl.RLConfig).parse_args(["--kl", "k4"])
    assert "argument --kl: invalid choice: 'k4'" in capsys.readouterr().err


def test_none_is_legal_only_where_it_is_the_default():
    rollout.RolloutConfig(seed=None, max_total_tokens=None)
    settings.check(rl.RLConfig(max_total_tokens=None))
    with pytest.raises(ValueError, match=r"RLConfig.seed=None: must be >= 0"):
        settings.check(rl.RLConfig(seed=None))


def test_a_rollout_config_with_a_bad_value_is_refused_when_made():
    with pytest.raises(ValueError, match=r"RolloutConfig.top_p=0: must be in \(0, 1\]"):
        rollout.RolloutConfig(top_p=0)
    with pytest.raises(ValueError, match=r"RolloutConfig.max_new_tokens=0: must be >= 1"):
        rollout.RolloutConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match=r"RolloutConfig.seed=-1: must be >= 0"):
        rollout.RolloutConfig(seed=-1)


def test_the_rl_rollout_settings_are_the_rollouts_own_declaration():
    mine, theirs = ({f.name: f for f in dataclasses.fields(cls)} for cls in (rl.RLConfig, rollout.RolloutConfig))
    for name in ("max_turns", "max_new_tokens", "max_obs_tokens", "max_total_tokens", "topk", "top_p"):
        assert mine[name].metadata == theirs[name].metadata and mine[name].default == theirs[name].default, name
    temperature = {k: v for k, v in mine["temperature"].metadata.items() if k != "help"}
    assert temperature == {k: v for k, v in theirs["temperature"].metadata.items() if k != "help"}
    assert "every RL log-prob" in mine["temperature"].metadata["help"]


def test_an_option_that_is_no_field_is_bounded_the_same_way(capsys):
    parser = cli.ArgumentParser(prog="x")
    parser.add_argument("--samples", type=cli.bounded(int, ge=1), default=1)
    assert parser.parse_args(["--samples", "3"]).samples == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["--samples", "0"])
    assert "argument --samples: must be >= 1, got 0" in capsys.readouterr().err

"""Settings and the command line every entry point shares: each setting's legal range, flags made
from config dataclasses, and errors a person can act on printed as one line.

What it does: RANGES / CHOICES hold the legal values of every numeric and enumerated setting of the
config dataclasses (sft.SupervisedConfig, rl.RLConfig, rollout.RolloutConfig); `check_config`
applies them to a config (for callers of the Python API) and `add_config_args` turns a config's
fields into --options that check them at parse time, with the field's `# comment` as the help.
`run_cli` runs an entry point so that a user error (bad argument, missing file, a run that stopped
on purpose: `Stopped`) prints one line and exits 2, an interrupted run exits 128 + the signal.

What it does not do: define the configs (each lives beside the code it configures) or the stages'
own options (train.py's parse_args, arc_eval.main).

    import cli
    parser = cli.ArgumentParser(prog="train.py")
    cli.add_config_args(parser, rl.RLConfig)       # --lr, --beta, ... each with its range in --help
    cli.check_config(rl.RLConfig(lr=2.0))          # ValueError: RLConfig.lr=2.0: must be in [0, 1]
    cli.run_cli(main)                              # in `if __name__ == "__main__":`
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import os
import re
import sys

import dgpo


# the legal values of the enumerated options (rl.RLConfig's): the CLI offers them as choices, the
# trainers check them
CHOICES = {"algo": ("grpo", "ppo"), "teacher_mode": ("selective", "uniform", "none"),
           "teacher_as": ("loss", "reward"), "kl": ("full", "k2", "k3"), "agg": dgpo.AGG_MODES}


# The legal range of every numeric setting, (low, high, low is allowed, high is allowed), None = no
# bound; every value must also be finite. The CLI checks them at parse time (they show in --help);
# the trainers check them again for callers of the Python API. Why some bounds exist: grad_clip 0
# would clip every update to nothing; a negative beta pushes the student away from the teacher;
# AdamW moves every weight by about lr per step and shrinks it by lr·weight_decay, so above 1 either
# destroys the model within steps (lr 1e30: NaN logits two steps later, in sampling). (RL also needs
# temperature > 0: rl.py.)
RANGES = {
    "steps": (1, None, True, None), "batch_size": (1, None, True, None),
    "micro_batch_size": (1, None, True, None), "lr": (0, 1, True, True),
    "min_lr_ratio": (0, 1, True, True), "warmup_steps": (0, None, True, None),
    "weight_decay": (0, 1, True, True), "grad_clip": (0, None, False, None), "lam": (0, None, True, None),
    "seed": (0, None, True, None), "eval_every": (0, None, True, None), "save_every": (0, None, True, None),
    "prompts_per_step": (1, None, True, None), "group_size": (1, None, True, None),
    "mini_batches": (1, None, True, None), "rollout_batch_size": (1, None, True, None),
    "warmup_ratio": (0, 1, True, True), "beta": (0, None, True, None), "clip_low": (0, 1, True, False),
    "clip_high": (0, None, True, None), "entropy_coef": (0, None, True, None),
    "temperature": (0, None, True, None), "top_p": (0, 1, False, True), "max_turns": (0, None, True, None),
    "max_new_tokens": (1, None, True, None), "max_obs_tokens": (0, None, True, None),
    "max_total_tokens": (1, None, True, None), "topk": (1, None, True, None), "eval_limit": (0, None, True, None),
    "critic_lr": (0, 1, True, True), "critic_warmup_ratio": (0, 1, True, True), "value_clip": (0, None, False, None),
    "gamma": (0, 1, True, True), "gae_lambda": (0, 1, True, True), "max_draws": (1, None, True, None),
    "probe_samples": (0, None, True, None), "pool_eval_limit": (0, None, True, None),
    "retriever_retry_seconds": (0, None, True, None), "retriever_timeout": (0, None, False, None),
}


def range_text(name: str) -> str:
    low, high, low_ok, high_ok = RANGES[name]
    if high is None:
        return f"{'>=' if low_ok else '>'} {low}"
    return f"in {'[' if low_ok else '('}{low}, {high}{']' if high_ok else ')'}"


def in_range(name: str, value) -> bool:
    """Inside RANGES[name], and finite: no setting means anything at inf or NaN (`--lr inf` would
    only crash steps later, in sampling)."""
    low, high, low_ok, high_ok = RANGES[name]
    if value is None:
        return name == "max_total_tokens"
    if not math.isfinite(value):
        return False
    above = value >= low if low_ok else value > low
    below = high is None or (value <= high if high_ok else value < high)
    return above and below


def check_config(cfg) -> None:
    """Every numeric setting of a config inside its RANGES, every enumerated one among CHOICES."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in RANGES and not in_range(f.name, value):
            finite = "finite and " if value is not None and not math.isfinite(value) else ""
            raise ValueError(f"{type(cfg).__name__}.{f.name}={value!r}: must be {finite}{range_text(f.name)}")
        if f.name in CHOICES and value not in CHOICES[f.name]:
            raise ValueError(f"{type(cfg).__name__}.{f.name}={value!r}: must be one of {CHOICES[f.name]}")


class Stopped(RuntimeError):
    """A run that stopped on purpose, with a message for the person running it (a diverged run, a
    weight made non-finite, an interrupt): the command line prints it as one line."""


class Interrupted(Stopped):
    """Raised after a run stopped by SIGINT / SIGTERM has saved its resumable checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage block of a stage runs to ~28 lines and hides the
    message; --help shows it), and a negative number such as `--lr -1e-3` read as the option's
    value, so the range check answers it (argparse takes "-1e-3" for an option: "expected one
    argument")."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        return super().parse_known_args(glue_negative_numbers(sys.argv[1:] if args is None else list(args)),
                                        namespace)


def glue_negative_numbers(argv: list[str]) -> list[str]:
    """["--lr", "-1e-3"] -> ["--lr=-1e-3"]: a number that starts with "-" after a --long option is its value."""
    out = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and arg.startswith("-") and _is_number(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def field_comments(config_cls) -> dict:
    """The `# comment` after each field of a config dataclass, by field name: the one place a
    setting is explained, in the source and in --help alike."""
    comments = {}
    for line in inspect.getsource(config_cls).splitlines():
        match = re.match(r"\s+(\w+): [^=]+=[^#]*#\s*(.+)$", line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    return comments


def add_config_args(parser: argparse.ArgumentParser, config_cls) -> None:
    comments = field_comments(config_cls)
    for f in dataclasses.fields(config_cls):
        flag, default = f"--{f.name.replace('_', '-')}", f.default
        what = (comments[f.name] + " ").replace("%", "%%") if f.name in comments else ""
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=f"{what}(default: {default})")
            continue
        # a None default (e.g. `seed: int | None = None`) takes its type from the annotation
        kind = type(default) if default is not None else (int if "int" in str(f.type) else float)
        legal = f"{range_text(f.name)}, " if f.name in RANGES else ""
        parser.add_argument(flag, dest=f.name, type=ranged(f.name, kind) if f.name in RANGES else kind,
                            default=default, choices=CHOICES.get(f.name), help=f"{what}({legal}default: {default})")


def ranged(name: str, kind):
    """An argparse type that parses `kind` and refuses values outside RANGES[name] at parse time."""
    def parse(text: str):
        value = kind(text)
        if not in_range(name, value):
            finite = "" if math.isfinite(value) else "finite and "
            raise argparse.ArgumentTypeError(f"must be {finite}{range_text(name)}, got {text}")
        return value
    parse.__name__ = kind.__name__          # argparse names the type in its messages
    return parse


def config_from_args(args, config_cls):
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})


def add_retriever_client_args(parser) -> None:
    """How patient the client of a retrieval server is (used only with --retriever-url)."""
    parser.add_argument("--retriever-retry-seconds", type=ranged("retriever_retry_seconds", float), default=300.0,
                        metavar="S", help="keep retrying a failing retrieval server for up to S seconds, with backoff "
                        "and a line per retry, so a run rides out a server restart (>= 0; 0: one attempt; default: 300)")
    parser.add_argument("--retriever-timeout", type=ranged("retriever_timeout", float), default=30.0, metavar="S",
                        help="seconds one retrieval request may take; a CPU-FAISS server answering a large batch "
                             "needs more (> 0, default: 30)")


# what a person can act on: bad arguments, files, models, a missing optional package, a run that
# stopped on purpose. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, ImportError, Stopped)


def run_cli(entry, argv=None) -> None:
    """Runs a command-line entry point `entry(argv)`: a user error (USER_ERRORS) prints one line,
    "error: …", and exits 2; an interrupted run prints how to continue it and exits 128 + the
    signal's number (130 for Ctrl-C, 143 for SIGTERM), as a shell does. `--debug` anywhere on the
    line keeps the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        entry(argv)
    except USER_ERRORS as error:
        if debug:
            raise
        where = f"[rank {os.environ['RANK']}] " if os.environ.get("WORLD_SIZE", "1") != "1" else ""
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
        print(f"{where}error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(128 + error.signum if isinstance(error, Interrupted) else 2) from None

"""The command line every entry point shares: --options made from config dataclasses, and errors a
person can act on printed as one line.

What it does: `add_config_args` turns a config's fields into --options, each with the help, range and
default its field declares (settings.setting) in --help, its range and choices enforced at parse time;
`bounded` is the same parse-time check for an option that is no config field. `run_cli` runs an entry
point so that a user error (bad argument, missing file, a run that stopped on purpose: `Stopped`) prints
one line and exits 2, an interrupted run exits 128 + the signal.

What it does not do: declare any setting's legal values (each config field does, settings.py), define
the configs (each lives beside the code it configures) or the stages' own options (train.py's
parse_args, arc_eval.main).

    import cli
    parser = cli.ArgumentParser(prog="train.py")
    cli.add_config_args(parser, rl.RLConfig)       # --lr, --beta, ... each with its range in --help
    parser.add_argument("--samples", type=cli.bounded(int, ge=1), default=1)
    cli.run_cli(main)                              # in `if __name__ == "__main__":`
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import settings


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


def add_config_args(parser: argparse.ArgumentParser, config_cls, only: tuple[str, ...] | None = None) -> None:
    """An --option for every field of a config dataclass (`only`: for these fields), with the field's
    help, range and default in --help; a value outside its legal ones is refused at parse time."""
    for f in dataclasses.fields(config_cls):
        if only is not None and f.name not in only:
            continue
        flag, default = f"--{f.name.replace('_', '-')}", f.default
        what = (f.metadata["help"] + " ").replace("%", "%%") if f.metadata.get("help") else ""
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=f"{what}(default: {default})")
            continue
        # a None default (e.g. `seed: int | None = None`) takes its type from the annotation
        kind = type(default) if default is not None else (int if "int" in str(f.type) else float)
        legal = settings.range_text(f.metadata)
        parser.add_argument(flag, dest=f.name, type=checked(kind, f.metadata) if legal else kind, default=default,
                            choices=f.metadata.get("choices"), help=f"{what}({legal + ', ' if legal else ''}"
                                                                    f"default: {default})")


def checked(kind, legal):
    """An argparse type that parses `kind` and refuses a value `legal` (a field's metadata, or the
    bounds of `bounded`) does not allow, saying why (settings.problem)."""
    def parse(text: str):
        value = kind(text)
        wrong = settings.problem(legal, value)
        if wrong:
            raise argparse.ArgumentTypeError(f"{wrong}, got {text}")
        return value
    parse.__name__ = kind.__name__          # argparse names the type in its messages
    return parse


def bounded(kind, **bounds):
    """The argparse type of an option that is no config field: `kind` within `bounds` (ge, gt, le, lt,
    as settings.setting takes them), checked at parse time: `type=cli.bounded(int, ge=1)`."""
    return checked(kind, bounds)


def config_from_args(args, config_cls):
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})


def add_retriever_client_args(parser) -> None:
    """How patient the client of a retrieval server is (used only with --retriever-url)."""
    retry, timeout = dict(ge=0), dict(gt=0)
    parser.add_argument("--retriever-retry-seconds", type=bounded(float, **retry), default=300.0, metavar="S",
                        help="keep retrying a retrieval server that refuses or drops the connection or answers 5xx for "
                             "up to S seconds, with backoff and a line per retry, so a run rides out a server restart "
                             f"({settings.range_text(retry)}; 0: one attempt; default: 300)")
    parser.add_argument("--retriever-timeout", type=bounded(float, **timeout), default=None, metavar="S",
                        help="seconds one retrieval request may take; one that takes longer stops the run with an "
                             "error, never sent again beside the first (a CPU-FAISS server answering a large batch "
                             f"needs minutes) ({settings.range_text(timeout)}; default: no timeout, as Search-R1)")


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

"""Command-line flags generated from a dataclass, so an option is declared once.

A dataclass field declared with `option` carries everything about that option: its default,
its flag's help, choices, ``nargs`` and metavar, how the flag's text is parsed, and the rule its
value must follow (a ``check``). `add_flags` turns the fields into argparse flags (the ``dest``
is the field name), `from_flags` builds the dataclass back from the parsed namespace, and
`field_errors` runs the same checks for the dataclass's own validation. A flag's type runs its
field's check at parse time, so ``--ratio 0`` fails with argparse's usual one-line message
naming the flag, and ``TrainConfig(ratio=0).validate()`` fails with the same rule.

A check is ``value -> None`` (fine) or a message such as ``"must be >= 1; got 0"``; messages
are completed with the flag name (argparse) or the field's label (validation).

This module imports nothing from the project (it sits under the config it describes).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "SEED_RANGE",
    "Check",
    "DefaultsHelpFormatter",
    "add_distributed_flags",
    "add_flags",
    "at_least_one",
    "checked",
    "distributed_options",
    "field_errors",
    "flag_names",
    "from_flags",
    "in_unit_interval",
    "integer",
    "non_negative",
    "number",
    "option",
    "positive",
    "seed_problem",
]

Check = Callable[[Any], "str | None"]

_METADATA_KEY = "kwta_jax.option"
_FIELD_DEFAULT = object()  # sentinel: the flag's default is the field's default


@dataclasses.dataclass(frozen=True)
class _Option:
    """What `option` records in a field's metadata (see `option` for the meaning)."""

    help: str
    flag: str | bool = True
    parse: Callable[[str], Any] | None = None
    check: Check | None = None
    flag_check: Check | None = None
    choices: Sequence[Any] | None = None
    nargs: str | None = None
    metavar: str | None = None
    flag_default: Any = _FIELD_DEFAULT
    label: str | None = None


def option(
    default: Any,
    help: str,  # noqa: A002 - argparse's name for it
    *,
    flag: str | bool = True,
    parse: Callable[[str], Any] | None = None,
    check: Check | None = None,
    flag_check: Check | None = None,
    choices: Sequence[Any] | None = None,
    nargs: str | None = None,
    metavar: str | None = None,
    flag_default: Any = _FIELD_DEFAULT,
    label: str | None = None,
) -> Any:
    """A dataclass field with a default and the description of its command-line flag.

    Args:
      default: the field's default (immutable values only).
      help: the flag's help text.
      flag: ``True`` for ``--field-name``, a string for another name, ``False`` for a field
        that has no flag (it is still validated).
      parse: text -> value for the flag (default: the text itself).
      check: the rule every value of the field must follow (flag and validation).
      flag_check: a stricter rule for the flag only, used instead of ``check`` there (e.g. a
        flag whose absence already means 0 rejects an explicit 0).
      choices, nargs, metavar: as in argparse; ``choices`` is also checked by validation.
      flag_default: what the flag holds when it is not given, if not ``default``; ``None``
        means "not given" and `from_flags` then keeps the field's default (so a help text can
        describe a default that depends on other options).
      label: how validation messages name the field (default: its name).
    """
    spec = _Option(help, flag, parse, check, flag_check, choices, nargs, metavar,
                   flag_default, label)  # fmt: skip
    return dataclasses.field(default=default, metadata={_METADATA_KEY: spec})


def _options(cls_or_instance) -> list[tuple[dataclasses.Field, _Option]]:
    return [
        (f, f.metadata[_METADATA_KEY])
        for f in dataclasses.fields(cls_or_instance)
        if _METADATA_KEY in f.metadata
    ]


def flag_names(cls) -> dict[str, str]:
    """``{field name: flag}`` for every field of ``cls`` that has a flag, in field order."""
    return {
        f.name: spec.flag if isinstance(spec.flag, str) else "--" + f.name.replace("_", "-")
        for f, spec in _options(cls)
        if spec.flag
    }


# --------------------------------------------------------------------------------------------
# Parsing and checks.
# --------------------------------------------------------------------------------------------


def number(text: str) -> float:
    """A float flag value; a clear message for anything else."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def integer(text: str) -> int:
    """An int flag value; a clear message for anything else."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def in_unit_interval(value: float) -> str | None:
    return None if 0.0 < value <= 1.0 else f"must be in (0, 1]; got {value:g}"


def at_least_one(value: int) -> str | None:
    return None if value >= 1 else f"must be >= 1; got {value}"


def positive(value: float) -> str | None:
    if not value > 0:
        return f"must be > 0; got {value:g}"
    return None if math.isfinite(value) else f"must be finite; got {value:g}"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else f"must be >= 0; got {value:g}"


SEED_RANGE = (0, 2**32 - 1)


def seed_problem(value: int) -> str | None:
    """A seed is an integer in `SEED_RANGE` (what NumPy and JAX both accept, with room for
    the ``seed + 1`` the models and data splits derive)."""
    low, high = SEED_RANGE
    if isinstance(value, int) and low <= value <= high:
        return None
    return f"must be an integer in [{low}, {high}] (0 to 2**32 - 1); got {value}"


def checked(parse: Callable[[str], Any], check: Check | None) -> Callable[[str], Any]:
    """An argparse ``type``: ``parse`` the text, then fail with ``check``'s message."""
    if check is None:
        return parse

    def convert(text: str) -> Any:
        value = parse(text)
        problem = check(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    convert.__name__ = getattr(parse, "__name__", "value")  # argparse names the type by it
    return convert


def field_errors(instance) -> list[str]:
    """Every field of dataclass ``instance`` that breaks its `option`'s choices or check, as
    ``"<label> <message>"`` (``None`` values are "use the default" and are not checked)."""
    errors = []
    for f, spec in _options(instance):
        value = getattr(instance, f.name)
        label = spec.label or f.name
        if value is None:
            continue
        if spec.choices is not None and value not in spec.choices:
            errors.append(f"unknown {label} {value!r} (choose from {tuple(spec.choices)})")
        elif spec.check is not None and (problem := spec.check(value)):
            errors.append(f"{label} {problem}")
    return errors


# --------------------------------------------------------------------------------------------
# argparse.
# --------------------------------------------------------------------------------------------


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" suffix, left out where it says nothing: for a ``None``
    default, and where the help already describes the default in words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or "default" in text:
            return action.help
        return super()._get_help_string(action)


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls) -> dict[str, str]:
    """Adds a flag for every `option` field of dataclass ``cls`` (in field order) to
    ``parser``; the flag's ``dest`` is the field name. Returns `flag_names` of ``cls``."""
    names = flag_names(cls)
    for f, spec in _options(cls):
        if f.name not in names:
            continue
        kwargs: dict[str, Any] = dict(
            dest=f.name,
            help=spec.help,
            default=f.default if spec.flag_default is _FIELD_DEFAULT else spec.flag_default,
        )
        if spec.parse is not None:
            kwargs["type"] = checked(spec.parse, spec.flag_check or spec.check)
        for key in ("choices", "nargs", "metavar"):
            if getattr(spec, key) is not None:
                kwargs[key] = getattr(spec, key)
        parser.add_argument(names[f.name], **kwargs)
    return names


def from_flags(cls, namespace: argparse.Namespace, **changes):
    """``cls`` from the flags of `add_flags` in ``namespace``: a flag holding ``None`` (not
    given) keeps the field's default; ``changes`` replace fields (e.g. one value of a
    ``nargs`` flag)."""
    values = {
        name: getattr(namespace, name)
        for name in flag_names(cls)
        if getattr(namespace, name) is not None
    }
    return cls(**{**values, **changes})


# --------------------------------------------------------------------------------------------
# Multi-host flags, shared by train.py and attack.py.
# --------------------------------------------------------------------------------------------

_DISTRIBUTED = ("coordinator_address", "num_processes", "process_id")
_TIMEOUTS = ("init_timeout", "peer_timeout")  # kwta_jax.multihost's, not jax's


def add_distributed_flags(parser: argparse.ArgumentParser, what: str) -> None:
    """``--distributed``, ``--coordinator-address``, ``--num-processes``, ``--process-id``
    in a "multi-host" group; ``what`` says what every process must share."""
    dist = parser.add_argument_group("multi-host", f"one process per host, {what}")
    dist.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() before any JAX work; on SLURM / Open MPI / "
        "Kubernetes the cluster comes from the environment, elsewhere give the three options "
        "below (or JAX_COORDINATOR_ADDRESS)",
    )
    dist.add_argument(
        "--coordinator-address", metavar="HOST:PORT", default=None,
        help="address of process 0's coordinator (implies --distributed)",
    )  # fmt: skip
    dist.add_argument(
        "--num-processes", type=checked(integer, at_least_one), default=None,
        metavar="N", help="number of processes (implies --distributed)",
    )  # fmt: skip
    dist.add_argument(
        "--process-id", type=checked(integer, non_negative), default=None,
        metavar="I", help="this process's id, 0 .. N-1 (implies --distributed)",
    )  # fmt: skip
    dist.add_argument(
        "--init-timeout", type=checked(number, positive), default=None, metavar="S",
        help="seconds to wait for every process to join, then one error line naming the "
        "missing one (default 300)",
    )  # fmt: skip
    dist.add_argument(
        "--peer-timeout", type=checked(number, positive), default=None, metavar="S",
        help="seconds without a heartbeat after which a process counts as gone and the "
        "others stop with one error line (default 60)",
    )  # fmt: skip


def distributed_options(parser: argparse.ArgumentParser, args) -> dict | None:
    """The keywords of `kwta_jax.multihost.initialize` the flags of `add_distributed_flags`
    give (``None``: a single process; ``{}``: the cluster of the environment; the timeouts
    count only with one of the others)."""
    given = {k: getattr(args, k) for k in _DISTRIBUTED}
    given = {k: v for k, v in given.items() if v is not None}
    if not (args.distributed or given):
        return None
    given.update({k: getattr(args, k) for k in _TIMEOUTS if getattr(args, k) is not None})
    if "process_id" in given and "num_processes" in given:
        if given["process_id"] >= given["num_processes"]:
            parser.error(f"--process-id {given['process_id']} must be < --num-processes "
                         f"{given['num_processes']}")  # fmt: skip
    return given

"""Named settings: every limit and knob has a name, a default and a help text that says why.

Each subsystem declares its settings as a frozen dataclass whose fields are made with `setting()`.
The command line (`imguard run --help`, `imguard scan --help`), the configuration file of `imguard run`
(imguard/config.py) and docs/settings.md (`imguard config docs`) are built from these declarations, so a limit
cannot exist without being documented.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


def setting(default: Any, help: str) -> Any:
    """A dataclass field that carries its help text (shown by --help and in docs/settings.md)."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def option_name(field_name: str, prefix: str = "") -> str:
    return "--" + argument_dest(field_name, prefix).replace("_", "-")


def argument_dest(field_name: str, prefix: str = "") -> str:
    """The argparse attribute of a setting: its name, or `prefix_name` when two subsystems share a name
    (IrcLimits.max_held_bytes and XmppLimits.max_held_bytes become --irc-max-held-bytes, --xmpp-max-held-bytes)."""
    return f"{prefix}_{field_name}" if prefix else field_name


def option_prefix(key: str, settings_class: type) -> str:
    """The one prefix rule of per-protocol options: `key` (IrcLimits under "irc": --irc-max-held-bytes), unless every
    field already starts with it (MsnpLimits.msnp_max_payload: --msnp-max-payload, not --msnp-msnp-max-payload)."""
    return "" if all(f.name.startswith(key + "_") for f in dataclasses.fields(settings_class)) else key


@dataclasses.dataclass(frozen=True)
class Declared:
    """A setting as its class declares it, attached to the command-line option made from it (`action.declared`):
    the configuration file (imguard/config.py) and docs/settings.md read the options of a command and find
    here the declared default and help, so they cannot drift from the flags."""
    settings_class: type
    name: str
    default: Any
    help: str


def add_arguments(parser: argparse.ArgumentParser, settings_class: type, title: str | None = None,
                  prefix: str = "") -> None:
    """Add one command-line option per setting of `settings_class`, with its default in the help.
    With `prefix`, every option and its attribute are prefixed (see argument_dest)."""
    group = parser.add_argument_group(title or settings_class.__doc__.splitlines()[0])
    for field in dataclasses.fields(settings_class):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_text = f"{field.metadata.get('help', '')} (default: {default!r})"
        kind = type(default)
        dest = argument_dest(field.name, prefix)
        if kind is bool:
            action = group.add_argument(option_name(field.name, prefix), dest=dest, default=None,
                                        action=argparse.BooleanOptionalAction, help=help_text)
        elif kind in (int, float, str):
            action = group.add_argument(option_name(field.name, prefix), dest=dest, default=None, type=kind,
                                        metavar=dest.upper(), help=help_text)
        else:
            action = group.add_argument(option_name(field.name, prefix), dest=dest, default=None, action="append",
                                        metavar=dest.upper(), help=help_text)
        action.declared = Declared(settings_class, field.name, default, field.metadata.get("help", ""))


def from_arguments(settings_class: type, args: argparse.Namespace, prefix: str = "", **overrides: Any) -> Any:
    """Build `settings_class` from parsed options; options left unset keep their declared default.
    `prefix` as given to add_arguments."""
    values = {}
    for field in dataclasses.fields(settings_class):
        value = getattr(args, argument_dest(field.name, prefix), None)
        if value is not None:
            values[field.name] = value
    values.update(overrides)
    return settings_class(**values)


def describe(settings_class: type) -> list[tuple[str, Any, str]]:
    """(name, default, help) for each setting, for documentation."""
    rows = []
    for field in dataclasses.fields(settings_class):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        rows.append((field.name, default, field.metadata.get("help", "")))
    return rows

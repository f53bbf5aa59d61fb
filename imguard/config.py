"""The configuration file of `imguard run`, and docs/settings.md: both read from the command's own options.

    imguard run --config /etc/imguard/imguard.yaml --mode transparent@8081
    imguard config check FILE        file:line errors, exit 2; "FILE: OK" and exit 0
    imguard config example           the commented example (deploy/imguard.yaml is its output)
    imguard config docs              docs/settings.md

The file is a YAML mapping whose keys are the option names of `imguard run` without their dashes
(`listen-host: 10.0.0.1`, `mode: [transparent@8080]`, `quick-ack: false`); a repeatable option takes a list (or
one value). There is no second table of names: `keys(parser)` walks the options `imguard run` was built with
(imguard.settings.add_arguments attaches each setting's declaration to its option, see settings.Declared), so
a setting added to a settings class is a flag, a key and a line of docs/settings.md at once.

Precedence: declared default < the file < the command line. An option given on the command line replaces the
file's value; for a repeatable option the whole list (`--mode transparent@8081` replaces the file's `mode:`).
Pure configuration work: nothing here opens a socket or starts the gateway.
"""

from __future__ import annotations

import argparse
import difflib
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from imguard.policy.yamlsrc import Map, Seq, YamlError, load_yaml, type_name
from imguard.settings import KiB, Declared

# Options of `imguard run` that are not settings: the file itself, and --help.
NOT_KEYS = ("help", "config")


@dataclass(frozen=True)
class Key:
    """One key of the configuration file: an option of `imguard run`."""
    name: str                       # the option without its dashes: listen-host
    dest: str                       # the argparse attribute: listen_host
    kind: type                      # bool, int, float, str or list
    item_kind: type                 # a list's items: int or str (the kind itself otherwise)
    default: Any                    # the declared default (or the option's own, for an option that is no setting)
    help: str                       # the declared help, without the "(default: ...)" the flag's help adds
    section: str                    # the option's group: the settings class's title
    choices: tuple | None = None
    declared: Declared | None = None


def _key(action: argparse.Action, section: str) -> Key | None:
    names = [o for o in action.option_strings if o.startswith("--")]
    if not names or action.dest in NOT_KEYS:
        return None
    declared: Declared | None = getattr(action, "declared", None)
    if declared is not None:
        default, help_text = declared.default, declared.help
        kind = type(default) if type(default) in (bool, int, float, str) else list
        items = default if kind is list else []
        item_kind = int if kind is list and items and all(type(v) is int for v in items) else \
            (str if kind is list else kind)
    else:
        default, help_text = action.default, action.help or ""
        if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
            kind = bool
        elif isinstance(action, argparse._AppendAction):
            kind = list
        else:
            kind = action.type if action.type in (int, float) else str
        item_kind = str if kind is list else kind
    return Key(names[0][2:], action.dest, kind, item_kind, default, help_text, section,
               tuple(action.choices) if action.choices else None, declared)


def keys(parser: argparse.ArgumentParser) -> list[Key]:
    """Every key of `parser`'s configuration file: the settings in --help order, then the plain options."""
    found, plain = [], []
    for group in parser._action_groups:
        ungrouped = group.title in ("options", "optional arguments")
        for action in group._group_actions:
            key = _key(action, "other options" if ungrouped else group.title)
            if key is not None:
                (plain if ungrouped else found).append(key)
    return found + plain


# --- reading a file ---------------------------------------------------------------------------------

class ConfigFileError(Exception):
    """The file cannot be used; `errors` are `file:line: message` strings."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


KIND_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
              list: "a list"}


def _check_mode(value: str) -> str | None:
    from mitmproxy.proxy import mode_specs
    try:
        mode_specs.ProxyMode.parse(value)
    except ValueError as e:
        return f"not a listener mode ({e}): write transparent@8080, regular@8080, socks5@1080 or " \
               f"reverse:tcp://server:5222@5222"
    return None


def _check_with(parse: Callable[[list], Any]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        try:
            parse([value])
        except ValueError as e:
            return str(e)
        return None
    return check


def _parse_port_map(entries: list) -> Any:
    from imguard.protocols.detect import parse_port_map
    return parse_port_map(entries)


def _parse_fail_modes(entries: list) -> Any:
    from imguard.gateway.failmode import FailModes
    return FailModes.parse(entries)


# Checks of one value (a list's item) beyond its type, by key: what `imguard run` would only find when it builds
# the gateway, found here with the line it is on.
VALUE_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "mode": _check_mode, "ports": _check_with(_parse_port_map), "fail-mode": _check_with(_parse_fail_modes)}


def _scalar(key: Key, kind: type, value: Any) -> tuple[Any, str | None]:
    """(the value as the option would hold it, or an error message)."""
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        hint = " (quote it to make it a string)" if kind is str and isinstance(value, (bool, int, float)) else ""
        return value, f"{key.name}: expected {KIND_WORDS[kind]}, got {type_name(value)}{hint}"
    if key.choices and value not in key.choices:
        return value, f"{key.name}: {value!r} is not one of {', '.join(map(str, key.choices))}"
    check = VALUE_CHECKS.get(key.name)
    problem = check(value) if check is not None else None
    return value, (f"{key.name}: {problem}" if problem else None)


def _suggest(name: str, names: list[str]) -> str:
    candidate = name.strip().lstrip("-").replace("_", "-").lower()
    if candidate in names:
        return f"; did you mean {candidate!r}?"
    close = difflib.get_close_matches(candidate, names, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def parse_text(text: str, source: str, file_keys: list[Key]) -> dict[str, Any]:
    """{argparse dest: value} of a configuration file's text; ConfigFileError lists every problem,
    each as `source:line: message`."""
    try:
        data = load_yaml(text)
    except YamlError as e:
        raise ConfigFileError([f"{source}:{e.line}: {e.message}"]) from None
    if data is None:
        return {}
    if not isinstance(data, Map):
        raise ConfigFileError([f"{source}:{getattr(data, 'line', 1) or 1}: expected a mapping of setting names to "
                               f"values (listen-host: 10.0.0.1), got {type_name(data)}"])
    by_name = {k.name: k for k in file_keys}
    values: dict[str, Any] = {}
    errors: list[str] = []
    for name, value in data.items():
        line = data.line_of(name)
        key = by_name.get(name) if isinstance(name, str) else None
        if key is None:
            errors.append(f"{source}:{line}: unknown setting {name!r}{_suggest(str(name), list(by_name))}")
            continue
        if key.kind is not list:
            converted, problem = _scalar(key, key.kind, value)
            if problem:
                errors.append(f"{source}:{line}: {problem}")
            else:
                values[key.dest] = converted
            continue
        items = value if isinstance(value, list) else [value]
        if value is None or isinstance(value, dict):
            errors.append(f"{source}:{line}: {key.name}: expected a list (or one value), got {type_name(value)}")
            continue
        converted_items = []
        for index, item in enumerate(items):
            item_line = value.line_of(index) if isinstance(value, Seq) else line
            converted, problem = _scalar(key, key.item_kind, item)
            if problem:
                errors.append(f"{source}:{item_line}: {problem.replace(key.name + ':', f'{key.name} item:', 1)}")
            else:
                converted_items.append(converted)
        values[key.dest] = converted_items
    if errors:
        raise ConfigFileError(errors)
    return values


def read(path: Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """{argparse dest: value} of the configuration file at `path` for `parser`'s options (`imguard run`)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise ConfigFileError([f"{path}: cannot read the configuration file: {reason}"]) from None
    return parse_text(text, str(path), keys(parser))


def parse_args(parser: argparse.ArgumentParser, command: argparse.ArgumentParser, argv: list[str] | None,
               values: dict[str, Any]) -> argparse.Namespace:
    """Parse `argv` again with the file's `values` under the command line: a single value becomes the option's
    default (an option given wins); a list fills the option only when the command line left it empty, since a
    repeatable option would append to a default list instead of replacing it."""
    command.set_defaults(**{dest: value for dest, value in values.items() if not isinstance(value, list)})
    args = parser.parse_args(argv)
    for dest, value in values.items():
        if isinstance(value, list) and getattr(args, dest, None) is None:
            setattr(args, dest, list(value))
    return args


def check(path: Path, command: argparse.ArgumentParser) -> list[str]:
    """Every problem of the configuration file at `path` for `imguard run` (`command`): unknown keys, wrong types,
    then values the settings refuse once built (as `imguard run` would build them)."""
    try:
        values = read(path, command)
    except ConfigFileError as e:
        return e.errors
    args = command.parse_args([])
    for dest, value in values.items():
        setattr(args, dest, value)
    from imguard.gateway import cli as gateway_cli
    from imguard.sinks import check_settings
    try:
        gateway_cli.settings_from_args(args)
        limits = gateway_cli.limits_from_args(args)
    except (TypeError, ValueError) as e:
        return [f"{path}: {e}"]
    return [f"{path}: {error}" for error in check_settings(limits["SinkSettings"])]


# --- the example and docs/settings.md ----------------------------------------------------------------

# What deploy/imguard.yaml sets for the systemd unit (deploy/systemd/imguard@.service, which passes it with
# --config and gives each worker its own --mode transparent@PORT): key -> (value, why). Every other key is
# listed commented out at its default.
DEPLOYMENT = {
    "listen-host": ("10.0.0.1", "the gateway's address on the users' network (the REDIRECT target); "
                                "never 0.0.0.0 in production"),
    "data-dir": ("/var/lib/imguard", "the unit's StateDirectory"),
    "rules": (["/etc/imguard/rules"], "your policy: `cp -r rules /etc/imguard/` to start from the bundled one"),
    "signatures": ("/etc/imguard/signatures", "likewise the YARA signatures"),
}
NOTES = {"mode": "the unit gives each worker its listener on the command line (--mode transparent@%i), "
                 "which replaces this list"}


def _yaml(name: str, value: Any) -> list[str]:
    import yaml
    text = yaml.safe_dump({name: value}, default_flow_style=False, sort_keys=False, allow_unicode=True, width=1000)
    return text.rstrip("\n").splitlines()


def _comment(text: str, width: int = 118) -> list[str]:
    return textwrap.wrap(text, width=width, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False)


def example(command: argparse.ArgumentParser) -> str:
    """The commented configuration file: every key of `command` (`imguard run`) with its help, the DEPLOYMENT
    values set and the rest commented out at their default."""
    lines = [
        "# imguard's configuration file: /etc/imguard/imguard.yaml, read by `imguard run --config FILE` (the systemd",
        "# unit deploy/systemd/imguard@.service passes it). Generated by `imguard config example` from the settings'",
        "# declarations, like `imguard run --help` and docs/settings.md: keys are the options of `imguard run` without",
        "# their dashes, with the same meaning. An option given on the command line wins over this file (a repeatable",
        "# option replaces the file's whole list). Check a change with `imguard config check FILE` before a restart.",
        "#",
        "# Paths are used as written: give absolute ones (systemd starts imguard in /).",
        "#",
        "# Set here: what the systemd deployment needs. Every other setting is listed commented out at its default.",
    ]
    section = None
    for key in keys(command):
        if key.section != section:
            section = key.section
            lines += ["", "", f"# ==== {section} " + "=" * max(4, 110 - len(section))]
        lines.append("")
        lines += _comment(key.help + (f" [{', '.join(map(str, key.choices))}]" if key.choices else ""))
        if key.name in NOTES:
            lines += _comment(f"Note: {NOTES[key.name]}.")
        if key.name in DEPLOYMENT:
            value, why = DEPLOYMENT[key.name]
            lines += _comment(f"Deployment: {why}.")
            lines += _yaml(key.name, value)
        else:
            lines += ["# " + line for line in _yaml(key.name, key.default)]
    return "\n".join(lines) + "\n"


def _default_text(key: Key) -> str:
    value = key.default
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int) and value >= KiB:
        for unit, size in (("GiB", KiB ** 3), ("MiB", KiB ** 2), ("KiB", KiB)):
            if value % size == 0:
                return f"`{value}` ({value // size} {unit})"
        return f"`{value}`"
    if isinstance(value, (list, tuple)):
        return ", ".join(f"`{v}`" for v in value) if value else "`[]`"
    if value == "":
        return "`''`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def docs(parser: argparse.ArgumentParser, commands: dict[str, argparse.ArgumentParser]) -> str:
    """docs/settings.md: every setting of every command, with its default and help. `commands` maps a command
    name ("run", "scan", "pcap", "sniff") to its parser; `run` comes first, as the configuration file's keys."""
    lines = [
        "# Settings",
        "",
        "<!-- Generated by `imguard config docs > docs/settings.md` (or `make settings`) from the settings'",
        "     declarations (imguard.settings.setting); tests/test_config.py fails when it is out of date. -->",
        "",
        "Every limit and knob of imguard, with its default and why it is there. Each is a command-line option",
        "(`--listen-host`) and, for `imguard run`, a key of the configuration file (`listen-host: 10.0.0.1`,",
        "`imguard run --config FILE`; an option on the command line wins over the file). A repeatable option takes a",
        "list in the file (`mode: [transparent@8080]`). The commented example is `deploy/imguard.yaml`",
        "(`imguard config example`); `imguard config check FILE` reports a wrong key or value with its file and line.",
    ]
    documented: dict[tuple, str] = {}
    for name, command in commands.items():
        lines += [""] if lines[-1] != "" else []
        lines += [f"## imguard {name}" + (" (and its configuration file)" if name == "run" else ""), ""]
        section, section_keys = None, []
        groups: list[tuple[str, list[Key]]] = []
        for key in keys(command):
            if key.declared is None and name != "run":
                continue        # a command's own plain options: its --help
            if key.section != section:
                section, section_keys = key.section, []
                groups.append((section, section_keys))
            section_keys.append(key)
        for title, group_keys in groups:
            origin = {(k.declared.settings_class, k.name) for k in group_keys if k.declared is not None}
            seen_in = {documented.get(o) for o in origin}
            if origin and len(seen_in) == 1 and None not in seen_in:
                lines.append(f"- **{title}**: as for `imguard {seen_in.pop()}` above")
                continue
            for o in origin:
                documented.setdefault(o, name)
            if lines[-1] != "":
                lines.append("")
            lines += [f"### {title}", "", "| option | default | what and why |", "|---|---|---|"]
            for key in group_keys:
                text = key.help + (f". One of: {', '.join(map(str, key.choices))}" if key.choices else "")
                lines.append(f"| `--{key.name}` | {_cell(_default_text(key))} | {_cell(text)} |")
            lines.append("")
    while lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"

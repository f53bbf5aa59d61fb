"""YAML loading that remembers where things are, so every policy error can say `file:line`.

PyYAML's safe loader forgets the source position once a document is built. `LineLoader` builds the
same plain dicts and lists, but as `Map` and `Seq` subclasses that carry the line of the node itself
and of each key or item. Scalars stay plain Python values; their line is the line of the key or item
that holds them. Duplicate keys, which YAML would silently collapse, are an error here.
"""

from __future__ import annotations

from typing import Any

import yaml


class Map(dict):
    """A YAML mapping: `line` is where it starts, `key_lines[key]` where each key is."""
    line: int = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key_lines: dict[Any, int] = {}

    def line_of(self, key: Any) -> int:
        return self.key_lines.get(key, self.line)


class Seq(list):
    """A YAML sequence: `line` is where it starts, `item_lines[i]` where item i is."""
    line: int = 0

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.item_lines: list[int] = []

    def line_of(self, index: int) -> int:
        return self.item_lines[index] if 0 <= index < len(self.item_lines) else self.line


class LineLoader(yaml.SafeLoader):
    """yaml.SafeLoader that builds Map/Seq with line numbers (1-based) and refuses duplicate keys."""


def _construct_map(loader: LineLoader, node: yaml.MappingNode) -> Map:
    loader.flatten_mapping(node)
    mapping = Map()
    mapping.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value, not a list or mapping", key_node.start_mark) from None
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.key_lines[key] = key_node.start_mark.line + 1
    return mapping


def _construct_seq(loader: LineLoader, node: yaml.SequenceNode) -> Seq:
    seq = Seq()
    seq.line = node.start_mark.line + 1
    for item_node in node.value:
        seq.append(loader.construct_object(item_node, deep=True))
        seq.item_lines.append(item_node.start_mark.line + 1)
    return seq


LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


class YamlError(Exception):
    """A file that is not valid YAML; `line` is 1-based (0 when unknown)."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


def load_yaml(text: str) -> Any:
    """Parse one YAML document with line numbers; raise YamlError(line, message) on a syntax error."""
    try:
        return yaml.load(text, Loader=LineLoader)  # noqa: S506 - LineLoader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or "invalid YAML"
        if exc.context_mark is not None and exc.problem_mark is not None \
                and exc.problem_mark.index >= len(text.rstrip()):
            mark = exc.context_mark     # "but got <stream end>": point at what was left open
        line = mark.line + 1 if mark is not None else 0
        if exc.context and exc.problem:
            problem = f"{exc.context}: {exc.problem}" if "duplicate" not in exc.problem else exc.problem
        if "\t" in problem or "'\\t'" in problem:
            problem += " (YAML does not allow tabs for indentation; use spaces)"
        raise YamlError(line, f"YAML syntax error: {problem}") from None
    except yaml.YAMLError as exc:
        raise YamlError(0, f"YAML error: {exc}") from None
    except RecursionError:
        raise YamlError(0, "YAML error: the document is nested too deeply") from None


def type_name(value: Any) -> str:
    """The YAML word for a value's type, for error messages."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__

"""Reading a configuration into plain values, remembering where each was written.

The first half of :func:`gitplug.config.load_config` and
:func:`~gitplug.config.config_from_mapping`: :class:`_Walker` turns PyYAML's
composed node tree into dicts, lists and scalars itself, so that it can record
the line of every key path, refuse duplicate keys and honour ``<<`` merges;
:func:`_walk_python` copies a Python mapping the same way. Both expand
``${NAME}`` in every string (:func:`_interpolate`); a string that took text
from the environment is an :class:`_Interpolated`, which the schema may
convert to a number or a boolean. :class:`_Report` collects the problems of
reading and of validating, and raises them as one
:class:`~gitplug.errors.ConfigError`.

Separate from :mod:`gitplug.config.schema` because this is about YAML syntax
and line tracking, and knows none of gitplug's keys.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from ..errors import ConfigError

# --------------------------------------------------------------------------- reading

_KeyPath = tuple[str, ...]
_MAP_TAG, _SEQ_TAG = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_VAR = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class _Interpolated(str):
    """A string that took (part of) its value from the environment.

    Only such strings are converted for numeric and boolean fields: a number
    can only reach the YAML as text through ``${NAME}``.
    """

    template: str


@dataclass(frozen=True)
class _Problem:
    message: str
    key: str | None
    line: int | None


class _Report:
    """Collects every problem, and knows on which line each key path was written."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[_KeyPath, int] = {}
        self.problems: list[_Problem] = []

    def line(self, path: _KeyPath) -> int | None:
        # A missing key is reported on the line of its nearest written parent.
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path)

    def add(self, path: _KeyPath, message: str) -> None:
        self.problems.append(_Problem(message, ".".join(path) or None, self.line(path)))

    def expected(self, path: _KeyPath, what: str, value: Any) -> None:
        self.add(path, f"expected {what}, got {_show(value)}")

    def raise_if_any(self) -> None:
        if not self.problems:
            return
        # Stable sort: file order where lines are known, checks across keys last.
        first, *others = sorted(self.problems, key=lambda p: (p.line is None, p.line or 0))
        message = first.message
        if others:
            listed = "".join(f"\n  {ConfigError(p.message, file=self.file, line=p.line, key=p.key)}"
                             for p in others)
            message += f"\nand {len(others)} more problem(s):{listed}"
        raise ConfigError(message, file=self.file, line=first.line, key=first.key)


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    if isinstance(value, _Interpolated):
        text += f" (from {value.template!r})"
    return text


def _interpolate(text: str, environ: Mapping[str, str]) -> tuple[str, str | None]:
    """``text`` with ``${NAME}`` expanded and ``$${`` unescaped, or an error message."""
    if "${" not in text:
        return text, None
    out: list[str] = []
    pos, used_env = 0, False
    for match in _VAR.finditer(text):
        out.append(text[pos:match.start()])
        pos = match.end()
        if match.group(0) == "$${":
            out.append("${")
            continue
        name = match.group(1)
        if name is None:
            return text, (f"unterminated '${{' in {text!r}; write ${{NAME}}, "
                          "or '$${' for a literal '${'")
        if not _VAR_NAME.match(name):
            return text, (f"invalid variable name {name!r} in {text!r}; expected ${{NAME}} with "
                          "letters, digits and '_', or '$${' for a literal '${'")
        if name not in environ:
            return text, (f"{_UNSET_PREFIX}{name} is not set (used as ${{{name}}}); "
                          f"export {name}=... before starting gitplug, "
                          "or write '$${' for a literal '${'")
        out.append(environ[name])
        used_env = True
    out.append(text[pos:])
    if not used_env:
        return "".join(out), None
    result = _Interpolated("".join(out))
    result.template = text
    return result, None


_UNSET_PREFIX = "environment variable "


def _expand(value: str, path: _KeyPath, report: _Report, environ: Mapping[str, str],
            optional: frozenset[_KeyPath]) -> str | None:
    """Interpolate one string value, reporting a problem; None for an unset optional one.

    A key in ``optional`` whose ``${NAME}`` is not set reads as not configured
    (None) instead of a problem: read-only commands never use the secrets.
    """
    expanded, error = _interpolate(value, environ)
    if error:
        if error.startswith(_UNSET_PREFIX) and any(_matches(path, p) for p in optional):
            return None
        report.add(path, error)
    return expanded


def _matches(path: _KeyPath, pattern: _KeyPath) -> bool:
    """``path`` equals ``pattern``, where a ``*`` in the pattern matches any one key."""
    return len(path) == len(pattern) and all(p in ("*", k) for k, p in zip(path, pattern))


class _Walker:
    """Turns a composed YAML node tree into plain values, recording each key's line."""

    def __init__(self, report: _Report, environ: Mapping[str, str],
                 optional: frozenset[_KeyPath] = frozenset()) -> None:
        self.report = report
        self.environ = environ
        #: Key paths whose unset ``${NAME}`` is not a problem (see :func:`_expand`).
        self.optional = optional
        self.constructor = yaml.constructor.SafeConstructor()
        self.active: set[int] = set()  # nodes being walked: guards recursive aliases

    def node(self, node: yaml.Node, path: _KeyPath) -> Any:
        if id(node) in self.active:
            self.report.add(path, "a YAML alias refers to itself; remove the recursion")
            return None
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self.mapping(node, path)
            if isinstance(node, yaml.SequenceNode):
                self.check_tag(node, _SEQ_TAG, path)
                return [self.child(item, path + (str(i),), item.start_mark.line + 1)
                        for i, item in enumerate(node.value)]
            return self.scalar(node, path)
        finally:
            self.active.discard(id(node))

    def child(self, node: yaml.Node, path: _KeyPath, key_line: int) -> Any:
        # Scalars point at their value; collections at the key that holds them.
        scalar = isinstance(node, yaml.ScalarNode)
        self.report.lines[path] = node.start_mark.line + 1 if scalar else key_line
        return self.node(node, path)

    def check_tag(self, node: yaml.Node, tag: str, path: _KeyPath) -> None:
        if node.tag != tag:
            self.report.add(path, f"unsupported YAML tag {node.tag!r}; remove the tag")

    def scalar(self, node: yaml.Node, path: _KeyPath) -> Any:
        try:
            value = self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            self.report.add(path, f"cannot read this value: {getattr(exc, 'problem', exc)}")
            return None
        if isinstance(value, str):
            return _expand(value, path, self.report, self.environ, self.optional)
        return value

    def mapping(self, node: yaml.MappingNode, path: _KeyPath) -> dict[Any, Any]:
        self.check_tag(node, _MAP_TAG, path)
        merged: dict[Any, Any] = {}
        # `<<: *defaults` first, so that the mapping's own keys (and lines) win.
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE_TAG:
                continue
            many = isinstance(value_node, yaml.SequenceNode)
            for src in value_node.value if many else [value_node]:
                if not isinstance(src, yaml.MappingNode):
                    self.report.add(path, "'<<' must merge a mapping (or a list of mappings)")
                    continue
                for key, value in self.node(src, path).items():
                    merged.setdefault(key, value)  # earlier sources win, as in YAML
        result: dict[str, Any] = {}
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                self.report.lines[path + ("?",)] = key_line
                self.report.add(path + ("?",), "a key must be a plain scalar, not a collection")
                continue
            # Keys stay the text written: `on:` or `no:` are names here, not YAML 1.1 booleans,
            # and `${...}` in a key is not expanded.
            key = key_node.value
            key_path = path + (key,)
            if key in seen:
                self.report.lines[key_path] = key_line
                self.report.add(key_path, f"duplicate key {key!r} (first on line {seen[key]}); "
                                          "YAML would silently keep only the last. Remove one.")
                continue
            seen[key] = key_line
            result[key] = self.child(value_node, key_path, key_line)
        return {**{k: v for k, v in merged.items() if k not in result}, **result}


def _walk_python(value: Any, path: _KeyPath, report: _Report, environ: Mapping[str, str],
                 optional: frozenset[_KeyPath] = frozenset()) -> Any:
    """Copy a Python configuration value, expanding ``${NAME}`` in its strings."""
    if isinstance(value, Mapping):
        return {k: _walk_python(v, path + (str(k),), report, environ, optional)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_walk_python(v, path + (str(i),), report, environ, optional)
                for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, str):
        return _expand(value, path, report, environ, optional)
    return value


def _plain(value: Any) -> Any:
    """Deep copy with :class:`_Interpolated` turned back into ``str``."""
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return str(value)
    return copy.deepcopy(value)

"""URL prefix rules shared by the configuration and the runtime.

A plugin is mounted at a URL prefix: a literal path (``/shop``), a path with
converters (``/<lang_code>/shop``, as ``register_blueprint`` takes it), or the
site root (``/``, one plugin per host: it serves what the host and the other
plugins do not). The configuration refuses two plugins whose prefixes could
match the same path, and the runtime checks the same before it publishes a
release. Both ask this module, so the two checks can never disagree.
Imports nothing of gitplug.
"""

from __future__ import annotations

import functools
import re
import typing as t

from werkzeug.routing import Map, parse_converter_args

__all__ = [
    "PrefixConverterError",
    "PrefixPattern",
    "ROOT",
    "prefix_problem",
    "invalid_prefix_message",
    "mount_key",
    "prefixes_overlap",
    "under_prefix",
]

#: The site root: the prefix of a root plugin (README, "Writing a plugin": mounting).
ROOT = "/"

_BAD_PREFIX_CHAR = re.compile(r"[\s?#]")
# Werkzeug's syntax of one converter in a rule: <variable>, <conv:variable>, <conv(args):variable>.
_CONVERTER = re.compile(
    r"<(?:(?P<converter>[a-zA-Z_][a-zA-Z0-9_]*)(?:\((?P<arguments>.*?)\))?:)?(?P<variable>[a-zA-Z_][a-zA-Z0-9_]*)>"
)
#: Converters that match across '/' (a prefix's variable must stay in its segment).
_MULTI_SEGMENT = frozenset({"path"})


def prefix_problem(prefix: str) -> str | None:
    """Why ``prefix`` cannot be a plugin's ``url_prefix``, or None if it can.

    The one rule for every way a prefix comes in (the configuration,
    ``load_directory``, ``--dev``, a ``Plugin(url_prefix=...)``). One trailing
    ``/`` is allowed: as in Flask, ``/foo/`` with the rule ``""`` is the URL
    ``/foo/``, and ``/foo/`` joined with ``/bar`` (or ``//bar``) is ``/foo/bar``.
    Converters are checked for syntax here; whether the host knows a
    converter's name is checked when the plugin is mounted.
    """
    if not prefix.startswith("/"):
        return "it must start with '/'"
    if prefix == ROOT:
        return None
    if "//" in prefix:
        return "it must not contain '//'"
    if _BAD_PREFIX_CHAR.search(prefix):
        return "no spaces, '?' or '#'"
    names: set[str] = set()
    for match in _CONVERTER.finditer(prefix):
        converter, variable = match.group("converter") or "default", match.group("variable")
        if converter in _MULTI_SEGMENT:
            return f"the converter {converter!r} in {match.group(0)!r} spans segments; a prefix's converter must stay within one, such as '<lang_code>'"
        if "/" in match.group(0):
            return f"the converter {match.group(0)!r} holds a '/'; a prefix's converter must stay within one segment"
        try:
            parse_converter_args(match.group("arguments") or "")
        except ValueError as exc:
            return f"the converter arguments of {match.group(0)!r} do not parse ({exc})"
        if variable in names:
            return f"the variable {variable!r} appears twice"
        names.add(variable)
    if re.search(r"[<>]", _CONVERTER.sub("", prefix)):
        return "a '<' or '>' that is not a converter such as '<lang_code>' or '<int:page>'"
    return None


def invalid_prefix_message(plugin: str, prefix: str) -> str | None:
    """The one-line error for plugin ``plugin`` mounted at an invalid ``prefix``, or None."""
    problem = prefix_problem(prefix)
    if problem is None:
        return None
    return (
        f"plugin {plugin!r}: url_prefix {prefix!r} is not a valid URL prefix ({problem})."
        " Give a prefix such as '/hello' (README, \"Writing a plugin\": mounting)."
    )


def mount_key(prefix: str) -> str:
    """The form of a valid prefix that routing and clash checks compare: no trailing ``/``."""
    return prefix[:-1] if len(prefix) > 1 and prefix.endswith("/") else prefix


def under_prefix(path: str, prefix: str) -> bool:
    """True if URL ``path`` is literal ``prefix`` itself or lies below it (by whole segments)."""
    return path == prefix or path.startswith(prefix + "/")


class PrefixConverterError(ValueError):
    """A prefix's converter that the URL map it is checked against lacks, or that spans segments."""


class PrefixPattern:
    """A valid prefix, parsed: which paths it owns and which prefixes it could clash with.

    ``url_map`` gives the converters (the host's at mount time); without one,
    Werkzeug's defaults, and a converter they lack is taken to match any
    segment (the configuration cannot know the host's converters).
    With ``url_map`` given, such a converter, or one whose regex spans
    segments, raises :class:`PrefixConverterError`.
    """

    __slots__ = ("prefix", "key", "root", "variable", "segments", "regex")

    def __init__(self, prefix: str, url_map: Map | None = None) -> None:
        self.prefix = prefix
        self.key = mount_key(prefix)
        self.root = self.key == ROOT
        self.variable = "<" in self.key
        #: One entry per segment: the literal text, or a compiled pattern of a
        #: segment holding converters.
        self.segments: list[str | re.Pattern[str]] = []
        #: Matches a path that is the prefix or lies below it (variable prefixes only).
        self.regex: re.Pattern[str] | None = None
        if self.root:
            return
        parts = []
        for segment in self.key.split("/")[1:]:
            if "<" not in segment:
                self.segments.append(segment)
                parts.append(re.escape(segment))
                continue
            pattern = _segment_regex(segment, url_map)
            self.segments.append(re.compile(pattern))
            parts.append(pattern)
        if self.variable:
            self.regex = re.compile("/" + "/".join(parts) + r"(?=/|\Z)")

    @property
    def literal_head(self) -> str:
        """The leading segments without converters (``/de`` of ``/de/<x>``; ``""`` if none)."""
        head = []
        for segment in self.segments:
            if not isinstance(segment, str):
                break
            head.append(segment)
        return "".join("/" + segment for segment in head)

    def kept_out_of(self, reserved: str) -> bool:
        """True if this prefix may coexist with a ``reserved`` literal prefix (gitplug's API).

        A literal prefix must not overlap it. The root and a prefix with
        converters never own a path under it at run time, so only one whose
        literal head already lies under it (it could own nothing) is refused.
        """
        if self.root:
            return True
        if not self.variable:
            return not self.could_overlap(_default_pattern(mount_key(reserved)))
        head = self.literal_head
        return not (head and under_prefix(head, mount_key(reserved)))

    def owns(self, path: str) -> bool:
        """True if URL ``path`` is this prefix or lies below it (the root owns every path)."""
        if self.root:
            return True
        if self.regex is not None:
            return self.regex.match(path) is not None
        return under_prefix(path, self.key)

    def holds_rule(self, rule: str) -> bool:
        """True if a rule's path lies under this prefix by its literal text.

        ``/de/shop/cart`` lies under ``/<lang_code>/shop``; ``/<page>`` lies
        under no prefix but the root: a converter in a rule is not taken to
        claim a prefix's segment (as ``/<page>`` does not claim ``/shop``).
        """
        if self.root:
            return True
        if not self.variable:
            return under_prefix(rule, self.key)
        rule_segments = rule.split("/")[1:]
        if len(rule_segments) < len(self.segments):
            return False
        return all(
            "<" not in text and _segment_matches(mine, text)
            for mine, text in zip(self.segments, rule_segments)
        )

    def could_overlap(self, other: PrefixPattern) -> bool:
        """True if some path could be owned by both (the root only overlaps the root)."""
        if self.root or other.root:
            return self.root and other.root
        for mine, theirs in zip(self.segments, other.segments):
            if isinstance(mine, str) and isinstance(theirs, str):
                if mine != theirs:
                    return False
            elif isinstance(mine, str):
                if not _segment_matches(theirs, mine):
                    return False
            elif isinstance(theirs, str):
                if not _segment_matches(mine, theirs):
                    return False
            # Two segments with converters: taken to overlap (no cheap exact test).
        return True

    def __repr__(self) -> str:
        return f"<PrefixPattern {self.prefix!r}>"


def _segment_matches(segment: str | re.Pattern[str], text: str) -> bool:
    if isinstance(segment, str):
        return segment == text
    return segment.fullmatch(text) is not None


_default_map: Map | None = None


def _segment_regex(segment: str, url_map: Map | None) -> str:
    global _default_map
    converters: t.Mapping[str, t.Any]
    if url_map is None:
        if _default_map is None:
            _default_map = Map()
        url_map = _default_map
        lenient = True
    else:
        lenient = False
    converters = url_map.converters
    pattern, pos = "", 0
    for match in _CONVERTER.finditer(segment):
        pattern += re.escape(segment[pos : match.start()])
        pos = match.end()
        name = match.group("converter") or "default"
        cls = converters.get(name)
        if cls is None:
            if not lenient:
                raise PrefixConverterError(
                    f"the converter {name!r} in {match.group(0)!r} is not one of the host's"
                    f" (url_map.converters: {', '.join(sorted(converters))})"
                )
            regex = "[^/]+"
        else:
            args, kwargs = parse_converter_args(match.group("arguments") or "")
            converter = cls(url_map, *args, **kwargs)
            regex = converter.regex
            if not getattr(converter, "part_isolating", True):
                if not lenient:
                    raise PrefixConverterError(
                        f"the converter {name!r} in {match.group(0)!r} matches across '/'; a"
                        " prefix's converter must stay within one segment"
                    )
                regex = "[^/]+"
        pattern += f"(?:{regex})"
    return pattern + re.escape(segment[pos:])


@functools.lru_cache(maxsize=256)
def _default_pattern(prefix: str) -> PrefixPattern:
    return PrefixPattern(prefix)


def prefixes_overlap(a: str, b: str) -> bool:
    """True if some path could lie under both valid prefixes (one is, or lies inside,
    the other; or their converters could match the same segments).

    Werkzeug's default converters decide; one the configuration cannot know
    is taken to match any segment. The site root overlaps only itself.
    """
    return _default_pattern(mount_key(a)).could_overlap(_default_pattern(mount_key(b)))

"""Business logic: names and greetings. No Flask in here, so it is easy to test."""

from __future__ import annotations

import re
import typing as t
import unicodedata
from collections.abc import Mapping

__all__ = [
    "DEFAULT_GREETING",
    "MAX_NAME_LENGTH",
    "InvalidName",
    "InvalidConfig",
    "clean_name",
    "greeting_from_config",
    "make_greeting",
]

#: Used when the plugin's configuration has no ``GREETING``.
DEFAULT_GREETING = "Hello"
#: Longest name accepted, in characters.
MAX_NAME_LENGTH = 40
#: The name greeted when none is given.
ANONYMOUS = "world"

_SPACES = re.compile(r"\s+")


class InvalidName(ValueError):
    """A name the form or the API cannot greet; the message is shown to the user."""


class InvalidConfig(ValueError):
    """The plugin's ``config`` mapping holds a value it cannot use."""


def clean_name(raw: str | None) -> str:
    """Normalise a user-supplied name, or raise :class:`InvalidName`.

    Whitespace runs collapse to one space; an empty name is refused, as are
    control characters and names longer than :data:`MAX_NAME_LENGTH`.
    """
    name = _SPACES.sub(" ", unicodedata.normalize("NFC", raw or "")).strip()
    if not name:
        raise InvalidName("Please type a name to greet.")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(f"That name is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}.")
    if any(unicodedata.category(ch).startswith("C") for ch in name):
        raise InvalidName("Names cannot contain control characters.")
    return name


def greeting_from_config(config: Mapping[str, t.Any]) -> str:
    """The greeting word from the plugin's configuration (``GREETING``).

    Raises :class:`InvalidConfig` for a value that is not a non-empty string,
    which makes the health check fail and the deploy abort.
    """
    value = config.get("GREETING", DEFAULT_GREETING)
    if not isinstance(value, str) or not value.strip():
        raise InvalidConfig(
            f"config GREETING must be a non-empty string, got {value!r};"
            " fix `config: GREETING:` of the plugin in deploy.yaml."
        )
    return value.strip()


def make_greeting(name: str = ANONYMOUS, greeting: str = DEFAULT_GREETING) -> str:
    """``make_greeting("Ada", "Hello") == "Hello, Ada!"``."""
    return f"{greeting}, {name}!"

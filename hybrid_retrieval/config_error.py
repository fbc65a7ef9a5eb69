"""How a check of the user's input fails: :class:`ConfigError` (an option; the message names it, the value and what
was expected) and :class:`UserError`'s kinds, raised where a value, a file or a folder the user gave is found
wrong. Every entry point shows these as the message alone, without a traceback (``cli.own_error``); any other
exception is a bug and keeps its stack. Its own module, on the lowest floor, so that every check raises them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BadValue", "ConfigError", "FolderExpected", "MissingPath", "NoPermission", "NotAFile", "UserError",
           "positive_int", "require"]


class UserError:
    """Marks an exception as the user's (a value, file or folder they gave), not a bug. Each kind is also its
    built-in exception type, so ``except ValueError`` still catches a :class:`BadValue`; the message is shown under
    the built-in name."""

    @classmethod
    def shown_name(cls) -> str:
        return next(kind.__name__ for kind in cls.__mro__ if kind.__module__ == "builtins" and kind is not object)


class BadValue(UserError, ValueError):
    """A value (an option, a data field, a file's content) that cannot work."""


class MissingPath(UserError, FileNotFoundError):
    """A file or folder that does not exist."""


class FolderExpected(UserError, NotADirectoryError):
    """A path that should be a folder and is not."""


class NotAFile(UserError, IsADirectoryError):
    """A path that should be a file and is a folder."""


class NoPermission(UserError, PermissionError):
    """A path the process may not read or write."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the option."""

    @classmethod
    def shown_name(cls) -> str:
        return cls.__name__


def require(condition: bool, option: str, expected: str, value: Any) -> None:
    """Raise ``ConfigError("<option>=<value>: expected <expected>")`` unless `condition`."""
    if not condition:
        raise ConfigError(f"{option}={value!r}: expected {expected}")


def positive_int(value: Any) -> bool:
    """An int above 0 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0

"""How a config check fails: :class:`ConfigError`, whose message names the option, the value and what was expected.

Its own module so that the owners of a concern (``run_folder.py``, ...) and :mod:`hybrid_retrieval.config_checks`
raise the same error without importing each other.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ConfigError", "require"]


class ConfigError(ValueError):
    """A config value that cannot work; the message names the option."""


def require(condition: bool, option: str, expected: str, value: Any) -> None:
    """Raise ``ConfigError("<option>=<value>: expected <expected>")`` unless `condition`."""
    if not condition:
        raise ConfigError(f"{option}={value!r}: expected {expected}")

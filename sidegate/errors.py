"""Errors of the shared core.

    SidegateError
    ├── ConfigError      gateway.yaml is invalid: ``FILE:LINE: key.path: problem`` (exit 2)
    ├── SettingsError    a bad flag or SIDEGATE_* variable (exit 2)
    └── StackError       ``sidegate up`` could not start or keep the stack (exit 1)

Sidecar packages keep their own hierarchies in their own ``errors.py``.
"""

from __future__ import annotations


class SidegateError(Exception):
    """Base of every error Sidegate raises on purpose."""

    exit_code = 1


class ConfigError(SidegateError):
    """An invalid gateway.yaml; ``str()`` is the one line an operator reads."""

    exit_code = 2

    def __init__(self, file: str, line: int | None, path: str, problem: str) -> None:
        self.file = file
        self.line = line
        self.path = path
        self.problem = problem
        where = f"{file}:{line}" if line is not None else file
        super().__init__(f"{where}: {path}: {problem}" if path else f"{where}: {problem}")
        self.errors: tuple[str, ...] = (str(self),)


class SettingsError(SidegateError):
    """A flag or environment variable that cannot be used."""

    exit_code = 2


class StackError(SidegateError):
    """A process of the local stack failed to start or died."""

"""Errors a user can hit: one class per failure, each with an exit code and a one-line message.

Exit codes are a contract that admins' scripts rely on: 0 success, 1 runtime failure, 2 invalid
input or config, 3 refused by policy, 4 verification failed.
"""

from __future__ import annotations


class NvrGuardError(Exception):
    """Base class: ``str(err)`` is the one-line message shown to the user."""

    exit_code = 1


class RuntimeFailure(NvrGuardError):
    exit_code = 1


class DaemonUnavailable(NvrGuardError):
    exit_code = 1


class InvalidInput(NvrGuardError):
    exit_code = 2


class ConfigError(NvrGuardError):
    """A config file is invalid. ``errors`` holds (file, line, message) triples."""

    exit_code = 2

    def __init__(self, errors: list[tuple[str, int, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{f}:{ln}: {m}" for f, ln, m in errors))

    def lines(self) -> list[str]:
        return [f"{f}:{ln}: {m}" for f, ln, m in self.errors]


class ConfigMismatch(InvalidInput):
    """A command asked the daemon about a config file other than the one it runs under."""


class PolicyRefused(NvrGuardError):
    """Not authorised, not approved, outside hours, media not clean, guard tripped."""

    exit_code = 3


class SessionEnded(PolicyRefused):
    """A web session that is unknown, expired or logged out (exit 3): log in again."""


class GuardTripped(PolicyRefused):
    exit_code = 3


class VerifyFailed(NvrGuardError):
    """Audit chain or export package tampered with."""

    exit_code = 4

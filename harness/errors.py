"""Errors the harness reports to the user as one clear line (CLI exit code 2), never a traceback."""

from __future__ import annotations


class InputError(Exception):
    """Bad user input: names the file, key or tensor and says what was expected."""


class PortFailure(Exception):
    """A backend under test crashed or hung: a finding about the port, not about the harness."""


class ArchitectureNotSupported(InputError):
    """The port (its converter or its library) has no implementation of this architecture.

    A statement about the port's coverage, not a missing backend: pytest skips it even under
    ``--require-backends``, the CLI reports it as a finding.
    """

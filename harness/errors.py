"""Errors the harness reports to the user as one clear line (CLI exit code 2), never a traceback."""

from __future__ import annotations


class InputError(Exception):
    """Bad user input: names the file, key or tensor and says what was expected."""


class PortFailure(Exception):
    """A backend under test crashed or hung: a finding about the port, not about the harness."""

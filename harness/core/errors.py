"""Errors the harness reports to the user as one clear line (CLI exit code 2), never a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class InputError(Exception):
    """Bad user input: names the file, key or tensor and says what was expected."""


class PortFailure(Exception):
    """A backend under test crashed or hung: a finding about the port, not about the harness."""


class ReferenceFailure(InputError):
    """The reference itself could not run the checkpoint: no verdict about any port is possible
    (exit 2, like bad input, with the reference's error named)."""


class ArchitectureNotSupported(InputError):
    """The port (its converter or its library) has no implementation of this architecture.

    A statement about the port's coverage, not a missing backend: pytest skips it even under
    ``--require-backends``, the CLI reports it as a finding.
    """


def describe_exception(e: BaseException) -> str:
    """The exception and its innermost frame: enough to tell where a port broke."""
    import traceback
    from pathlib import Path

    tb = traceback.extract_tb(e.__traceback__)
    where = f" ({Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    if isinstance(e, SystemExit):
        return f"called sys.exit({e.code!r}){where}"
    return f"{type(e).__name__}: {e}{where}"


@contextmanager
def port_boundary(label: str, doing: str) -> Iterator[None]:
    """Run code of a port under test: whatever it raises, a ``sys.exit`` included, becomes a
    :class:`PortFailure` naming the port and what it was doing.  Input errors and port failures
    pass through; KeyboardInterrupt and the harness's own termination are never swallowed."""
    try:
        yield
    except InputError:
        raise
    except PortFailure as e:
        if label in str(e):
            raise
        raise PortFailure(f"{label} {doing}: {e}") from e
    except (Exception, SystemExit) as e:
        raise PortFailure(f"{label} {doing}: {describe_exception(e)}") from e

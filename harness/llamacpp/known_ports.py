"""Every llama.cpp name map the harness knows: upstream's (:data:`harness.llamacpp.names.PORTS`)
plus the ports this repository ships (``ports/``).

Our ports keep their name maps beside their patches and are built with :mod:`harness.llamacpp`'s
tools, so :mod:`harness.llamacpp.names` cannot import them (that was a circle); this module sits
above both.
"""

from __future__ import annotations

from harness.llamacpp.names import PORTS, PortNames
from ports.llamacpp import port as ours

__all__ = ["all_ports", "port_for_arch"]


def all_ports() -> dict[str, PortNames]:
    """Name maps by port name: upstream's, then ours."""
    return {**PORTS, ours.PORT_NAME: ours.NAMES}


def port_for_arch(arch: str) -> PortNames:
    """The name map for a GGUF's ``general.architecture``; KeyError lists what is known."""
    known = all_ports()
    for port in known.values():
        if port.arch == arch:
            return port
    raise KeyError(f"no llama.cpp name map for arch {arch!r}; known: {sorted(known)}")

"""Our llama.cpp port of Ling-2.6 (``bailing_hybrid``): a patch series and its tooling.

See :mod:`ports.llamacpp.port`.
"""

from ports.llamacpp.port import ARCH, MTP_NAMES, NAMES, PORT_NAME, patches

__all__ = ["ARCH", "MTP_NAMES", "NAMES", "PORT_NAME", "patches"]

"""The bottom layer: errors, the capture-point vocabulary (with what usually breaks at each point),
``Captures``, tolerances, metrics, verdicts, the cache root, atomic files, process lifecycle and
progress.

Nothing here imports the rest of the harness, and only the standard library, numpy and pandas at
import time (``tests/test_architecture.py`` checks it), so the reference and every backend can
depend on it without a circle.
"""

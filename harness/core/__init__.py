"""The bottom layer: errors, capture-point vocabulary, verdicts, atomic files, process lifecycle.

Nothing here imports the rest of the harness (``tests/test_architecture.py`` checks it), so the
reference and every backend can depend on it without a circle.
"""

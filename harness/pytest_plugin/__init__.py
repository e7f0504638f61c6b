"""The pytest front end: case files become test items; ``--benchmark`` adds bench items."""

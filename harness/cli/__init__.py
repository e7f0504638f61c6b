"""``python -m harness``: the command-line front end (one module per subcommand)."""

"""Registers the parity plugin: ``pytest cases/`` turns every case file into test items."""

pytest_plugins = ["harness.pytest_plugin.plugin"]

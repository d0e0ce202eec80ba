"""The `bitnet-jax` command line: main.py parses and dispatches, one module per command."""

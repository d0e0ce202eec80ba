"""The `bitnet-jax` command line: main.py dispatches `bitnet-jax <name>` to <name>.py's main(argv)
and turns errors into exit codes; common.py holds the flags and helpers the commands share.
Nothing is imported here, so `bitnet-jax --version` and Ctrl-C handling come before JAX loads."""

"""The argument parser every `bitnet-jax` command builds: argument errors as one line.

argparse prints the usage block and then the error; the CLI's contract (cli/main.py) is one
line `error: <message> (see `<prog> --help`)` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys


def usage_error(message: str, prog: str) -> int:
    """Print an argument error as the CLI's one line; returns the exit status, 2."""
    try:
        print(f"error: {message} (see `{prog} --help`)", file=sys.stderr, flush=True)
    except (OSError, ValueError):  # a closed or broken stderr
        pass
    return 2


class CommandParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose argument errors are one line and exit 2."""

    def error(self, message: str):
        raise SystemExit(usage_error(message, self.prog))

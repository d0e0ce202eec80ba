"""`bitnet-jax COMMAND ...`: dispatch to `bitnet_jax.cli.<command>.main(argv)`.

This is the only place that turns errors into output and exit codes:

  0    success, `--help`, `--version`, or stdout closed early (`bitnet-jax infer ... | head`)
  1    a user error (a BitNetError): one line `error: <message>` on stderr
  2    bad arguments: one line `error: <message> (see `bitnet-jax CMD --help`)` on stderr
  130  Ctrl-C, at any moment, with no traceback

Only the standard library, bitnet_jax.errors and cli/parser.py are imported here; each command is
imported inside main()'s try block, so `--version` answers at once and Ctrl-C while JAX is
still importing exits quietly too. stdout carries only a command's output (generated text, or
one JSON line for `bench --json`); statistics and messages go to stderr.
"""

from __future__ import annotations

import gc
import importlib
import os
import signal
import sys
import threading

import bitnet_jax
from bitnet_jax.cli.parser import usage_error
from bitnet_jax.errors import BitNetError

# Command name -> one-line help. Each lives in bitnet_jax/cli/<name>.py as main(argv) -> int and
# parses its arguments with cli/parser.py's CommandParser (argument errors: one line, exit 2).
COMMANDS = {
    "infer": "generate text from a prompt (alias: generate)",
    "chat": "interactive multi-turn chat",
    "bench": "measure prefill and decode speed",
    "tokenize": "show how a model's tokenizer encodes a text, or decode token ids",
    "convert": "convert an HF folder or a GGUF file to GGUF",
    "inspect": "describe a GGUF file",
    "train": "quantisation-aware training",
    "perplexity": "perplexity of a model on a text file",
    "serve": "OpenAI-compatible HTTP server ([serve] extra)",
}
ALIASES = {"generate": "infer"}
PACKAGE = "bitnet_jax.cli"


def main(argv: list[str] | None = None) -> int:
    """Run one `bitnet-jax` command. Returns the process exit code.

    argv None means "run as the program" (sys.argv[1:]). Then Ctrl-C is ignored once the
    command has returned: Python resets its own handlers early in shutdown, and a Ctrl-C after
    that would kill the process by signal instead of exiting with the command's code.
    """
    as_program = argv is None
    previous = None
    code = 130
    try:
        previous = _install_sigint_handler()
        code = _run(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        _say("\ninterrupted")
        if as_program:
            # JAX may be interrupted mid-compile, with its threads still running; Python's
            # shutdown can then crash (SIGSEGV). The command has unwound (its finally blocks
            # ran), so leave without the interpreter's teardown.
            _flush()
            _hard_exit(130, quiet=True)
        code = 130
    except BrokenPipeError:  # the reader of stdout went away: not an error
        _silence_stdout()
        code = 0
    finally:
        if as_program:
            _set_sigint_handler(signal.SIG_IGN)
        elif previous is not None:
            _set_sigint_handler(previous)
    return code


def error_message(exc: BaseException) -> str:
    """The text to show for an error: its CLI wording when it has one."""
    return getattr(exc, "cli_message", None) or str(exc)


def _run(argv: list[str]) -> int:
    if not argv:
        return usage_error("no command given; choose one of " + ", ".join(COMMANDS), "bitnet-jax")
    first = argv[0]
    if first in ("-V", "--version"):
        print(f"bitnet-jax {bitnet_jax.__version__}")
        return 0
    if first in ("-h", "--help"):
        print(_help())
        return 0
    name = ALIASES.get(first, first)
    if name not in COMMANDS:
        what = f"unknown option {first!r}" if first.startswith("-") else \
            f"unknown command {first!r}"
        return usage_error(f"{what}; choose one of {', '.join(COMMANDS)}", "bitnet-jax")
    try:
        return _import(name).main(argv[1:]) or 0
    except SystemExit as exc:  # argparse (--help: 0; argument errors, already one line: 2)
        return _exit_code(exc)
    except BitNetError as exc:
        _say(f"error: {error_message(exc)}")
        return 1


def _import(name: str):
    module_name = f"{PACKAGE}.{name}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name in (PACKAGE, module_name):
            raise BitNetError(f"the `{name}` command is not available in this installation "
                              f"({module_name} is missing); reinstall bitnet-jax.") from None
        if exc.name and not exc.name.startswith("bitnet_jax"):
            top = exc.name.split(".")[0]
            raise BitNetError(f"the `{name}` command needs the Python package {top!r}; "
                              f"install it with `pip install {top}`.") from None
        raise


def _help() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: bitnet-jax [-h] [-V] COMMAND [ARGS ...]", "",
             "BitNet b1.58 models in JAX: generate, chat, benchmark, convert, train.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "options:", "  -h, --help     show this help and exit",
              "  -V, --version  print the version and exit", "",
              "`bitnet-jax COMMAND --help` shows a command's options."]
    return "\n".join(lines)


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    _say(f"error: {exc.code}")
    return 1


# ------------------------------------------------------------------------------------------------
# Ctrl-C
#
# Python turns SIGINT into KeyboardInterrupt wherever the main thread happens to be. In three
# places that does not end the program quietly: inside a C extension's import (jaxlib turns it
# into an ImportError, or crashes), and inside a gc callback or a __del__ method (Python prints
# "Exception ignored" and carries on, so the Ctrl-C is lost; JAX registers a gc callback that
# runs often). The handler below exits at once during an import, re-sends the signal a moment
# later from inside a callback, and raises KeyboardInterrupt everywhere else, so that commands
# (chat) can still catch it.


def _on_sigint(signum, frame) -> None:
    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        code = frame.f_code
        if code.co_filename.startswith("<frozen importlib"):
            _hard_exit(130)
        if code in callbacks or code.co_name == "__del__":
            timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT))
            timer.daemon = True
            timer.start()
            return
        frame = frame.f_back
    raise KeyboardInterrupt


def _install_sigint_handler():
    """Install _on_sigint; returns the previous handler (None when it cannot be changed)."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return None  # SIG_IGN (e.g. `nohup`, a background job) or the caller's own handler
    return _set_sigint_handler(_on_sigint)


def _set_sigint_handler(handler):
    try:
        return signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread (an embedding application)
        return None


def _hard_exit(code: int, quiet: bool = False) -> None:
    """Exit now, without unwinding or the interpreter's teardown."""
    if not quiet:
        try:
            os.write(2, b"\ninterrupted\n")
        except OSError:
            pass
    os._exit(code)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass


# ------------------------------------------------------------------------------------------------
# Output


def _say(text: str) -> None:
    """Print one line to stderr, ignoring a closed or broken stderr."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _silence_stdout() -> None:
    """Point stdout at /dev/null so Python's exit-time flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is both
        pass

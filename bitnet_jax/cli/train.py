"""`bitnet-jax train`: quantisation-aware training from a run config (configs/train-*.json).

Needs the [train] extra (optax, flax). Without it the command says so in one line: importing
this module always works, and main() raises a BitNetError naming the extra.
"""

from __future__ import annotations

import json
import sys
import warnings

from bitnet_jax.cli import common
from bitnet_jax.errors import BitNetError
from bitnet_jax.cli.parser import CommandParser

TRAIN_EXTRA = ("optax", "flax")
INSTALL_HINT = "pip install 'bitnet-jax[train]'"

try:
    from bitnet_jax.train import load_train_config, train
except ModuleNotFoundError as exc:
    if (exc.name or "").partition(".")[0] not in TRAIN_EXTRA:
        raise
    _MISSING: str | None = exc.name.partition(".")[0]
else:
    _MISSING = None


def main(argv: list[str]) -> int:
    """`bitnet-jax train --config configs/train-<name>.json [--stop-after N] [--field=value]`.

    Prints the last step's metrics as one JSON line on stdout; progress and warnings go to
    stderr. Rerunning the same command resumes from <out>/state.npz.

    Returns:
      0. User errors raise BitNetError; bad arguments exit 2 (argparse).
    """
    parser = CommandParser(
        prog="bitnet-jax train", description="Quantisation-aware training of a BitNet model.",
        epilog="Any run-config field can be overridden as --field=value (e.g. --steps=200).",
        allow_abbrev=False)  # so --no/--stop are never taken for our own flags
    parser.add_argument("--config", required=True, help="run config (configs/train-*.json)")
    parser.add_argument("--stop-after", type=common.positive_int, metavar="N", default=None,
                        help="stop after this many steps in all (rerun the command to resume)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, overrides = parser.parse_known_args(argv)
    if _MISSING is not None:
        raise BitNetError(f"`bitnet-jax train` needs the [train] extra ({_MISSING} is not "
                          f"installed): {INSTALL_HINT}")
    tcfg = load_train_config(args.config, overrides)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        last = train(tcfg, args.stop_after, progress=not args.no_progress)
    print(json.dumps(last))
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one `warning: ...` line on stderr (no source location)."""
    print(f"warning: {message}", file=sys.stderr)


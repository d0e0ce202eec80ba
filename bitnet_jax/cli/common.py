"""Helpers shared by the `bitnet-jax` commands: flags, their checks, model loading, prompt input.

  add_model_argument(parser)          --model, defaulting to the bundled model
  resolve_model(value) -> Path        the --model value, or the bundled model (checked)
  add_model_args(parser)              --model, --backend, --lm-head, --kv-cache, and the
                                      multi-device flags (--tensor-parallel, --data-parallel,
                                      --coordinator, --num-processes, --process-id)
  load_model_from_args(args)          start multi-host JAX, check the backend, load (sharded)
  run_policy(args, model)             the precision policy with --lm-head/--kv-cache applied
  add_sampling_args(parser)           --max-tokens, --temperature, --top-k, ... (checked)
  sampling_params(args)               SamplingParams from those flags
  read_text_file(path, flag)          a UTF-8 file, with one clear error when it cannot be read
  read_stdin(what)                    all of stdin as UTF-8 text
  check_utf8(text, flag, fix)         refuse command-line text that is not UTF-8
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import jax

from bitnet_jax.errors import BitNetError, CheckpointError
from bitnet_jax.formats import loader
from bitnet_jax.model.params import lm_head_format
from bitnet_jax.model.policy import get_policy
from bitnet_jax.model import sharding
from bitnet_jax.runtime.placement import resolve_device, resolve_policy
from bitnet_jax.runtime.sampling import SamplingParams

MODEL_HELP = "HF model folder or .gguf file (default: the bundled model)"


# ------------------------------------------------------------------------------------------------
# Model flags and loading


def add_model_argument(parser: argparse.ArgumentParser, help: str = MODEL_HELP) -> None:
    """--model PATH, None by default; `resolve_model(args.model)` turns None into the bundled
    model."""
    parser.add_argument("--model", metavar="PATH", help=help)


def resolve_model(value: str | Path | None) -> Path:
    """The model path to load: `value`, or the bundled default model when it is None.

    Raises:
      CheckpointError: no --model was given and the bundled model is missing.
    """
    if value is not None:
        return Path(value).expanduser()
    if not loader.DEFAULT_MODEL.exists():  # read at call time: tests point it elsewhere
        raise CheckpointError(
            f"no default model is bundled ({loader.DEFAULT_MODEL} is missing); pass --model "
            "PATH (an HF folder or a .gguf file).")
    return loader.DEFAULT_MODEL


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model, --backend, --lm-head and --kv-cache."""
    add_model_argument(parser)
    parser.add_argument("--backend", choices=("cpu", "gpu", "auto"), default="auto",
                        help="where to run (default auto: a GPU when JAX sees one)")
    parser.add_argument("--lm-head", choices=("auto", "float", "int8"), default="auto",
                        help="LM head precision: int8 per-row copy (fast; auto on CPU) or float")
    parser.add_argument("--kv-cache", choices=("auto", "float32", "float16", "bfloat16", "int8"),
                        default="auto", help="KV cache dtype (auto: float16 on CPU, as "
                        "llama.cpp; the compute dtype on GPU; int8: half the bytes, per-row "
                        "scales)")
    group = parser.add_argument_group("multiple devices (README, Multiple devices)")
    group.add_argument("--tensor-parallel", type=positive_int, default=1, metavar="N",
                       help="split the model over N devices (default 1)")
    group.add_argument("--data-parallel", type=positive_int, default=1, metavar="M",
                       help="split the batch over M groups of those (default 1)")
    group.add_argument("--coordinator", metavar="HOST:PORT",
                       help="multi-host: process 0's address for jax.distributed (or "
                       "JAX_COORDINATOR_ADDRESS); with --num-processes and --process-id")
    group.add_argument("--num-processes", type=positive_int, metavar="N",
                       help="multi-host: number of processes")
    group.add_argument("--process-id", type=non_negative_int, metavar="I",
                       help="multi-host: this process's index; only process 0 prints")


def load_model_from_args(args: argparse.Namespace):
    """Start multi-host JAX if asked (before anything touches a device), check the backend
    (fail fast), then load args.model (default: the bundled one), sharded over the
    --tensor-parallel x --data-parallel mesh when that is larger than one device."""
    start_distributed(args)
    device = resolve_device(args.backend)
    path = resolve_model(args.model)
    # The int8 LM head is made while loading, so the float table is never held in full.
    policy = get_policy("cpu").replace(lm_head=args.lm_head)
    return loader.load_model(path, policy=policy, mesh=run_mesh(args, device.platform))


def start_distributed(args: argparse.Namespace) -> None:
    """jax.distributed.initialize for --coordinator/--num-processes/--process-id (or JAX's
    environment variables); every process but 0 then writes nothing to stdout."""
    flags = (args.coordinator, args.num_processes, args.process_id)
    if all(f is None for f in flags) and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return
    try:
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes, process_id=args.process_id)
    except (ValueError, TypeError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BitNetError(f"multi-host start failed ({first}); pass --coordinator HOST:PORT "
                          "--num-processes N --process-id I on every process.") from None
    _keep_stdout_for_text(jax.process_index() == 0)


def _keep_stdout_for_text(printer: bool) -> None:
    """stdout carries only process 0's text: the CPU collectives (gloo) write notes to file
    descriptor 1 from C++, so fd 1 now points at stderr and sys.stdout at a copy of the real
    stdout (process 0) or at /dev/null (the others)."""
    sys.stdout.flush()
    if printer:
        out = os.fdopen(os.dup(1), "w", encoding=sys.stdout.encoding, errors=sys.stdout.errors,
                        buffering=1)
    else:
        out = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
    os.dup2(2, 1)
    sys.stdout = out


def run_mesh(args: argparse.Namespace, platform: str):
    """The data x tensor mesh of --data-parallel and --tensor-parallel on `platform`'s devices,
    or None for one device in one process."""
    tp, dp = args.tensor_parallel, args.data_parallel
    devices = jax.devices(platform)
    if jax.process_count() > 1 and tp * dp != len(devices):
        raise BitNetError(f"{jax.process_count()} processes hold {len(devices)} devices, but "
                          f"--data-parallel x --tensor-parallel = {dp} x {tp} uses {tp * dp}; "
                          "make the mesh cover every device.")
    if tp * dp == 1:
        return None
    return sharding.make_mesh(tensor=tp, data=dp, devices=devices)


def run_policy(args: argparse.Namespace, model):
    """The run's precision policy: the engine's choice, with --lm-head and --kv-cache."""
    device = resolve_device(args.backend)
    policy = resolve_policy(device, None, model.policy)
    head = lm_head_format(args.lm_head, model.config, device.platform)
    kv = args.kv_cache
    if kv == "auto":
        kv = "float16" if device.platform == "cpu" else None
    return policy.replace(lm_head=head, kv_cache_dtype=kv)


# ------------------------------------------------------------------------------------------------
# Sampling flags


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """--max-tokens and the SamplingParams knobs, each checked while parsing."""
    parser.add_argument("--max-tokens", type=non_negative_int, default=256, metavar="N",
                        help="most tokens to generate (default 256)")
    parser.add_argument("--temperature", type=temperature, default=0.8, metavar="T",
                        help="sampling temperature >= 0; 0 is greedy (default 0.8)")
    parser.add_argument("--top-k", type=non_negative_int, default=0, metavar="K",
                        help="keep the K most likely tokens; 0 = off (default)")
    parser.add_argument("--top-p", type=top_p, default=1.0, metavar="P",
                        help="nucleus sampling, in (0, 1]; 1 = off (default)")
    parser.add_argument("--min-p", type=min_p, default=0.0, metavar="P",
                        help="drop tokens below P x the top probability, in [0, 1); 0 = off "
                        "(default)")
    parser.add_argument("--repeat-penalty", type=repeat_penalty, default=1.0, metavar="R",
                        help="> 1 discourages repeating tokens; 1 = off (default)")
    parser.add_argument("--seed", type=seed, default=0, metavar="S",
                        help="random seed (default 0)")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          min_p=args.min_p, repetition_penalty=args.repeat_penalty,
                          seed=args.seed)


# argparse `type=` checks: each raises ArgumentTypeError with the rule and the value given.


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def seed(text: str) -> int:
    value = non_negative_int(text)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer below 2**32, got {text!r}")
    return value


def _number(text: str, rule: str, ok) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
    return value


def temperature(text: str) -> float:
    return _number(text, "a finite number >= 0 (0 is greedy)", lambda v: v >= 0)


def top_p(text: str) -> float:
    return _number(text, "a number in (0, 1] (1 turns it off)", lambda v: 0 < v <= 1)


def min_p(text: str) -> float:
    return _number(text, "a number in [0, 1) (0 turns it off)", lambda v: 0 <= v < 1)


def repeat_penalty(text: str) -> float:
    return _number(text, "a finite number > 0 (1 turns it off)", lambda v: v > 0)


# ------------------------------------------------------------------------------------------------
# Text input


def check_utf8(text: str, flag: str, fix: str = "pass UTF-8 text") -> str:
    """Return `text`, or raise BitNetError when it holds bytes that are not UTF-8.

    Python hands such command-line bytes over as lone surrogates ('\\udcff' for byte 0xff).
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = text[exc.start]
        what = (f"byte 0x{ord(char) - 0xDC00:02x}" if 0xDC80 <= ord(char) <= 0xDCFF
                else f"character U+{ord(char):04X}")
        raise BitNetError(f"{flag} is not valid UTF-8 ({what} at character {exc.start}); "
                          f"{fix}.") from None
    return text


def read_text_file(path: str | Path, flag: str) -> str:
    """The contents of a UTF-8 text file named by a flag, or one BitNetError naming what is
    wrong (missing, a folder, unreadable, not UTF-8)."""
    shown = str(path)
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BitNetError(f"{flag} {shown} does not exist; pass the path of a UTF-8 text "
                          "file.") from None
    except IsADirectoryError:
        raise BitNetError(f"{flag} {shown} is a folder; pass the path of a UTF-8 text "
                          "file.") from None
    except OSError as exc:
        raise BitNetError(f"{flag} {shown} cannot be read ({exc.strerror or exc}).") from None
    return _decode(data, f"{flag} {shown}", "save it as UTF-8")


def read_stdin(what: str) -> str:
    """All of stdin as UTF-8 text (`what` names it in errors, e.g. "the prompt on stdin")."""
    if sys.stdin is None:
        raise BitNetError(f"{what} was requested but there is no stdin.")
    if sys.stdin.isatty():
        print("(reading stdin; end it with Ctrl-D)", file=sys.stderr, flush=True)
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a replaced sys.stdin (tests, embedding)
        return sys.stdin.read()
    return _decode(buffer.read(), what, "pass UTF-8 text")


def strip_final_newline(text: str) -> str:
    """Drop one trailing newline, as llama.cpp does for -f files (editors add one)."""
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def _decode(data: bytes, what: str, fix: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BitNetError(f"{what} is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset "
                          f"{exc.start}); {fix}.") from None

"""`bitnet-jax` command line: infer, chat, bench, plus the tokenize/convert/inspect/train/
perplexity commands that live next to the code they drive.

stdout carries only generated text (or, for `bench --json`, one JSON line). Statistics and
messages go to stderr. Each user error (a BitNetError) prints one `error: <message>` line and
exits 1. Argument errors exit 2 and Ctrl-C exits 130, with no traceback for either.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from bitnet_jax.errors import BitNetError, CheckpointError, GenerationError
from bitnet_jax.formats.loader import DEFAULT_MODEL


# Commands owned by other modules: name -> ((module, function), ...) tried in order.
DELEGATED = {
    "tokenize": (("bitnet_jax.tokenizer", "tokenize_main"),),
    "convert": (("bitnet_jax.formats.gguf", "convert_main"), ("bitnet_jax.formats.gguf.write", "convert_main")),
    "inspect": (("bitnet_jax.formats.gguf", "inspect_main"),),
    "train": (("bitnet_jax.train.loop", "train_main"),),
    "perplexity": (("bitnet_jax.train.loop", "perplexity_main"),),
}
_DELEGATED_HELP = {
    "tokenize": "encode/decode text with a model's tokenizer",
    "convert": "convert a model to GGUF",
    "inspect": "describe a GGUF file",
    "train": "quantisation-aware training",
    "perplexity": "perplexity of a model on a text file",
}


def main(argv: list[str] | None = None) -> int:
    """Run one command. Returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in DELEGATED:
            return _delegate(argv[0], argv[1:])
        try:
            args = _parser().parse_args(argv)
        except SystemExit as exc:  # argparse: 2 for bad arguments, 0 for --help
            return _exit_code(exc)
        return args.handler(args) or 0
    except BitNetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C); stopped.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `bitnet-jax infer ... | head`
        sys.stderr.close()
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitnet-jax", description="BitNet b1.58 models in JAX: generate, chat, benchmark.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    infer = sub.add_parser("infer", aliases=["generate"], help="generate text from a prompt",
                           description="Stream a continuation of --prompt to stdout.")
    _model_args(infer)
    infer.add_argument("--prompt", required=True, help="the prompt text")
    _sampling_args(infer)
    infer.add_argument("--chat", action="store_true",
                       help="wrap the prompt in the model's chat template as a user turn")
    infer.add_argument("--system", help="system message (with --chat)")
    infer.add_argument("--stop", action="append", default=[],
                       help="stop when this text appears (repeatable)")
    infer.set_defaults(handler=_infer)

    chat = sub.add_parser("chat", help="interactive multi-turn chat",
                          description="Chat in the terminal. /reset clears the conversation; "
                                      "/exit or Ctrl-D quits.")
    _model_args(chat)
    _sampling_args(chat)
    chat.add_argument("--system", help="system message for the conversation")
    chat.set_defaults(handler=_chat)

    bench = sub.add_parser("bench", help="measure prefill and decode speed",
                           description="Time prefill and decode on random prompts after a "
                                       "warm-up run (compile time is reported separately).")
    _model_args(bench)
    bench.add_argument("--prompt-tokens", type=_positive, default=128)
    bench.add_argument("--gen-tokens", type=_positive, default=64)
    bench.add_argument("--batch", type=_positive, default=1)
    bench.add_argument("--json", action="store_true", help="print one JSON line to stdout")
    bench.set_defaults(handler=_bench)

    for name, text in _DELEGATED_HELP.items():  # listed for --help; main() dispatches them
        sub.add_parser(name, help=text, add_help=False)
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF folder or .gguf file (default: the bundled model)")
    p.add_argument("--backend", choices=("cpu", "gpu", "auto"), default="auto",
                   help="where to run (default: a GPU when JAX sees one)")
    p.add_argument("--lm-head", choices=("auto", "float", "int8"), default="auto",
                   help="LM head precision: int8 per-row copy (fast; auto on CPU) or float")
    p.add_argument("--kv-cache", choices=("auto", "float32", "float16", "bfloat16"),
                   default="auto", help="KV cache dtype (auto: float16 on CPU, as llama.cpp; "
                   "the compute dtype on GPU)")


def _policy(args, model):
    """The run's precision policy: the engine's choice, with the --lm-head override."""
    from bitnet_jax.model.params import lm_head_format
    from bitnet_jax.runtime.placement import resolve_device, resolve_policy

    device = resolve_device(args.backend)
    policy = resolve_policy(device, None, model.policy)
    head = lm_head_format(args.lm_head, model.config, device.platform)
    kv = args.kv_cache
    if kv == "auto":
        kv = "float16" if device.platform == "cpu" else None
    return policy.replace(lm_head=head, kv_cache_dtype=kv)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=_non_negative, default=256,
                   help="most tokens to generate (default 256)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=_non_negative, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=_non_negative, default=0, help="random seed (default 0)")


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


# ------------------------------------------------------------------------------------------------
# Handlers


def _load(args):
    """Check the backend first (fail fast), then load the model."""
    from bitnet_jax.runtime.placement import resolve_device
    from bitnet_jax.formats.loader import load_model
    from bitnet_jax.model.policy import get_policy

    device = resolve_device(args.backend)
    path = args.model
    if path is None:
        if not DEFAULT_MODEL.exists():
            raise CheckpointError(
                f"no default model is bundled ({DEFAULT_MODEL} is missing); pass --model PATH "
                "(an HF folder or a .gguf file).")
        path = DEFAULT_MODEL
    # The int8 LM head is made while loading, so the float table is never held in full.
    return load_model(path, policy=get_policy("cpu").replace(lm_head=args.lm_head))


def _sampling(args):
    from bitnet_jax.runtime.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          min_p=args.min_p, repetition_penalty=args.repeat_penalty,
                          seed=args.seed)


def _infer(args) -> int:
    from bitnet_jax.runtime.generate import stream

    model = _load(args)
    pieces = stream(model, args.prompt, max_new_tokens=args.max_tokens, sampling=_sampling(args),
                    backend=args.backend, chat=args.chat, system=args.system,
                    stop=args.stop or None, policy=_policy(args, model))
    text = _print_stream(pieces)
    if text and not text.endswith("\n"):
        print(flush=True)
    _print_stats(pieces.result)
    return 0


def _chat(args) -> int:
    from bitnet_jax.runtime.generate import stream

    model = _load(args)
    if model.tokenizer is None:
        raise CheckpointError(f"{model.source} has no tokenizer; chat needs one.")
    sampling = _sampling(args)
    policy = _policy(args, model)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("chat: type a message; /reset clears the conversation, /exit or Ctrl-D quits.",
          file=sys.stderr)
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            messages = messages[:1] if args.system else []
            print("(conversation cleared)", file=sys.stderr)
            continue
        turn = messages + [{"role": "user", "content": line}]
        try:
            pieces = stream(model, turn, max_new_tokens=args.max_tokens, sampling=sampling,
                            backend=args.backend, policy=policy)
            reply = _print_stream(pieces)
        except GenerationError as exc:  # e.g. the conversation outgrew the context
            print(f"error: {exc} (/reset starts a new conversation)", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # stop a runaway reply, keep the session
            print("\n(reply interrupted; it is not kept in the conversation)", file=sys.stderr)
            continue
        print(flush=True)
        messages = turn + [{"role": "assistant", "content": reply}]
        if pieces.result.finish_reason == "context_full":
            print("(the context is full; /reset to start over)", file=sys.stderr)


def _bench(args) -> int:
    from bitnet_jax.runtime.generate import benchmark

    model = _load(args)
    policy = _policy(args, model)
    stats = benchmark(model, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                      batch=args.batch, backend=args.backend, policy=policy)
    stats["lm_head"] = policy.lm_head
    stats["kv_cache"] = policy.kv_cache.name
    stats["model"] = str(model.source or args.model)
    stats["peak_rss_mb"] = _peak_rss_mb()
    if args.json:
        print(json.dumps(stats), flush=True)
    else:
        print(f"model {stats['model']} on {stats['device']} (jax {stats['jax_version']}), "
              f"batch {stats['batch']}\n"
              f"prefill: {stats['prompt_tokens']} tokens/row, "
              f"{stats['prefill_tokens_per_s']:.1f} tokens/s\n"
              f"decode:  {stats['gen_tokens']} tokens/row, "
              f"{stats['decode_tokens_per_s']:.1f} tokens/s\n"
              f"compile: {stats['compile_s']:.1f} s, peak RSS {stats['peak_rss_mb']:.0f} MB",
              file=sys.stderr)
    return 0


def _print_stream(pieces) -> str:
    parts = []
    for piece in pieces:
        parts.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    return "".join(parts)


def _print_stats(result) -> None:
    t = result.timings
    prefill_rate = result.prompt_tokens / t.prefill_s if t.prefill_s else 0.0
    print(f"[{len(result.token_ids)} tokens, finish={result.finish_reason}, "
          f"prefill {prefill_rate:.1f} tok/s, decode {t.tokens_per_s:.1f} tok/s, "
          f"compile {t.compile_s:.1f} s]", file=sys.stderr)


def _peak_rss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes vs KiB


def _delegate(name: str, argv: list[str]) -> int:
    """Run a command implemented in another module, imported only now."""
    tried = []
    for module_name, func_name in DELEGATED[name]:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                tried.append(f"{module_name}.{func_name}")
                continue
            raise BitNetError(f"the `{name}` command needs the Python package "
                              f"{exc.name!r}; install it with `pip install {exc.name}`.") from None
        func = getattr(module, func_name, None)
        if func is None:
            tried.append(f"{module_name}.{func_name}")
            continue
        try:
            return func(argv) or 0
        except SystemExit as exc:  # their argparse: --help or bad arguments
            return _exit_code(exc)
    raise BitNetError(f"the `{name}` command is not available in this installation "
                      f"({' / '.join(tried)} not found).")


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else 1

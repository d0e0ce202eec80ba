"""Smoke tests of the `bitnet-jax` command line (bitnet_jax/cli/): one test per command.

The model is the tiny config widened to GPT-2's 50257-token vocabulary, saved as an HF folder
with save_hf, next to GPT-2's vocab.json/merges.txt from ../shared/data (copied into tmp, never
into the project). These tests skip when the shared data is absent. The error behaviour of
issue 12 (one `error:` line, exit codes, Ctrl-C) is in test_cli_errors.py.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import jax
import pytest

from bitnet_jax.cli import infer as infer_command
from bitnet_jax.cli import main as cli
from bitnet_jax.formats import loader
from bitnet_jax.formats.hf import save_hf
from bitnet_jax.model.config import load_config
from bitnet_jax.runtime.generate import generate, stream
from bitnet_jax.formats.loader import DEFAULT_MODEL, load_model
from bitnet_jax.model.params import init_params, pack_params
from conftest import ROOT, require_shared

GPT2_VOCAB = 50257


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    gpt2 = require_shared("tokenizers", "gpt2")
    cfg = load_config(ROOT / "configs" / "tiny.json").replace(
        vocab_size=GPT2_VOCAB, bos_token_id=GPT2_VOCAB - 1, eos_token_id=GPT2_VOCAB - 1)
    params = pack_params(init_params(cfg, jax.random.key(0), std=0.3), cfg)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    save_hf(path, cfg, params)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2 / name, path / name)
    return path


def test_infer_streams_only_the_text_to_stdout(model_dir, capsys):
    args = ["infer", "--model", str(model_dir), "--prompt", "Hello", "--max-tokens", "5",
            "--temperature", "0"]
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    want = generate(load_model(model_dir), "Hello", max_new_tokens=5, temperature=0)[0]
    assert out == want.text + ("" if want.text.endswith("\n") else "\n")
    assert f"[{len(want.token_ids)} tokens, finish={want.finish_reason}" in err


def test_stream_with_the_real_tokenizer_concatenates_to_the_text(model_dir):
    # Random weights pick arbitrary byte-level tokens, so multi-byte characters get split
    # across tokens: the incremental decoder must still give back exactly the final text.
    model = load_model(model_dir)
    kwargs = dict(max_new_tokens=24, temperature=1.0, seed=1, ignore_eos=True)
    pieces = list(stream(model, "Hello", **kwargs))
    want = generate(model, "Hello", **kwargs)[0]
    assert "".join(pieces) == want.text == model.tokenizer.decode(want.token_ids)


def test_infer_default_sampling_is_reproducible(model_dir, capsys):
    args = ["infer", "--model", str(model_dir), "--prompt", "Once", "--max-tokens", "6"]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert cli.main(args) == 0
    assert capsys.readouterr().out == first


def test_bench_json_line(model_dir, capsys):
    args = ["bench", "--model", str(model_dir), "--prompt-tokens", "8", "--gen-tokens", "4",
            "--batch", "2", "--backend", "cpu", "--json"]
    assert cli.main(args) == 0
    stats = json.loads(capsys.readouterr().out)
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "batch", "backend", "device",
                "model", "jax_version", "compile_s", "peak_rss_mb"):
        assert key in stats
    assert stats["batch"] == 2 and stats["backend"] == "cpu"
    assert stats["decode_tokens_per_s"] > 0 and stats["prefill_tokens_per_s"] > 0
    assert stats["kv_cache"] == "float16"  # the CLI's CPU default, as llama.cpp
    # Three timed runs by default (llama-bench repeats too); the figures are their medians.
    assert stats["repetitions"] == 3 and len(stats["decode_runs"]) == 3
    assert stats["decode_tokens_per_s"] == sorted(stats["decode_runs"])[1]
    assert stats["prefill_tokens_per_s"] == sorted(stats["prefill_runs"])[1]


def test_bench_int8_kv_cache(model_dir, capsys):
    # --kv-cache int8: the run allocates int8 rows and reports them; a bad value is a usage error.
    args = ["bench", "--model", str(model_dir), "--prompt-tokens", "8", "--gen-tokens", "4",
            "--batch", "2", "--backend", "cpu", "--json", "--repetitions", "1", "--kv-cache"]
    assert cli.main(args + ["int8"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["kv_cache"] == "int8" and stats["decode_tokens_per_s"] > 0
    assert cli.main(args + ["int4"]) == 2
    assert "--kv-cache" in capsys.readouterr().err


def test_bench_repetitions(model_dir, capsys):
    args = ["bench", "--model", str(model_dir), "--prompt-tokens", "8", "--gen-tokens", "4",
            "--backend", "cpu", "--json", "--repetitions", "1"]
    assert cli.main(args) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["repetitions"] == 1 and stats["decode_runs"] == [stats["decode_tokens_per_s"]]
    assert cli.main(args[:-1] + ["0"]) == 2  # a usage error, as argparse gives
    assert "--repetitions" in capsys.readouterr().err


def test_chat_keeps_the_conversation_and_resets(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/reset\nhi again\n/exit\n"))
    # --lm-head float --kv-cache float32: the Python API's default precision, so the replies
    # compare exactly.
    args = ["chat", "--model", str(model_dir), "--max-tokens", "3", "--temperature", "0",
            "--lm-head", "float", "--kv-cache", "float32"]
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    assert "conversation cleared" in err
    model = load_model(model_dir)
    replies = [generate(model, [{"role": "user", "content": m}], max_new_tokens=3,
                        temperature=0)[0].text for m in ("hello", "hi again")]
    assert out == "".join(r + "\n" for r in replies)


def test_missing_default_model_is_one_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loader, "DEFAULT_MODEL", tmp_path / "default.gguf")
    assert cli.main(["infer", "--prompt", "x", "--backend", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no default model is bundled") and "--model" in err
    assert err.count("\n") == 1


def test_user_errors_print_one_line_and_exit_1(tmp_path, capsys):
    assert cli.main(["infer", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_argument_errors_exit_2(capsys):
    assert cli.main(["infer"]) == 2  # --prompt is required
    assert cli.main(["bench", "--batch", "0"]) == 2
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0


def test_ctrl_c_exits_130_with_a_message(monkeypatch, capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(infer_command, "main", interrupted)
    assert cli.main(["infer", "--prompt", "x"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


def test_commands_get_their_argv(monkeypatch, capsys):
    seen = {}
    fake = type(sys)("bitnet_jax.cli.train")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 3
    monkeypatch.setitem(sys.modules, "bitnet_jax.cli.train", fake)
    assert cli.main(["train", "--config", "x.json", "--steps=2"]) == 3
    assert seen["argv"] == ["--config", "x.json", "--steps=2"]

    monkeypatch.setitem(cli.COMMANDS, "no_such_command", "a command that is not installed")
    assert cli.main(["no_such_command"]) == 1
    assert "not available" in capsys.readouterr().err
    assert cli.main(["inspect", "--help"]) == 0  # the real command, its own argparse


def test_generate_is_infer(model_dir, capsys):
    args = ["--model", str(model_dir), "--prompt", "Hello", "--max-tokens", "3",
            "--temperature", "0"]
    assert cli.main(["infer"] + args) == 0
    first = capsys.readouterr().out
    assert cli.main(["generate"] + args) == 0
    assert capsys.readouterr().out == first


def test_gpu_backend_without_gpu_fails_cleanly(model_dir):
    if any(d.platform != "cpu" for d in jax.devices()):
        pytest.skip("a GPU is visible; this checks the CPU-only message")
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="")
    proc = subprocess.run(
        [sys.executable, "-m", "bitnet_jax", "infer", "--model", str(model_dir), "--prompt", "x",
         "--backend", "gpu"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: backend 'gpu'")
    assert 'pip install -U "jax[cuda13]"' in lines[-1]
    assert "Traceback" not in proc.stderr


def test_infer_reads_the_prompt_from_stdin_or_a_file(tmp_path, capsys, monkeypatch):
    args = ["--max-tokens", "4", "--temperature", "0", "--backend", "cpu"]
    assert cli.main(["infer", "--prompt", "In the beginning"] + args) == 0
    want = capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.StringIO("In the beginning\n"))
    assert cli.main(["infer", "--prompt", "-"] + args) == 0  # one final newline is dropped
    assert capsys.readouterr().out == want
    path = tmp_path / "prompt.txt"
    path.write_text("In the beginning\n", encoding="utf-8")
    assert cli.main(["infer", "--prompt-file", str(path)] + args) == 0
    assert capsys.readouterr().out == want


def test_convert_and_inspect(tmp_path, capsys):
    out = tmp_path / "out.gguf"
    assert cli.main(["convert", str(DEFAULT_MODEL), str(out), "--type", "i2_s",
                     "--name", "converted"]) == 0
    assert "wrote" in capsys.readouterr().out
    ours, theirs = load_model(out), load_model(DEFAULT_MODEL)
    assert ours.config == theirs.config
    prompt = dict(max_new_tokens=6, temperature=0)
    assert generate(ours, "In the beginning", **prompt)[0].token_ids == \
        generate(theirs, "In the beginning", **prompt)[0].token_ids
    assert cli.main(["inspect", str(out)]) == 0
    report = capsys.readouterr().out
    assert "name: converted" in report and "I2_S" in report and "tokenizer:" in report
    # Errors are one line with exit status 1, and a failed convert writes nothing.
    assert cli.main(["convert", str(tmp_path / "missing"), str(tmp_path / "x.gguf")]) == 1
    assert cli.main(["inspect", str(tmp_path / "nope.gguf")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and all(line.startswith("error: ") for line in err.splitlines())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]


def test_convert_help_lists_the_writer_types(capsys):
    from bitnet_jax.formats.gguf.write import QTYPES

    assert cli.main(["convert", "--help"]) == 0
    assert "{" + ",".join(QTYPES) + "}" in capsys.readouterr().out


def test_tokenize_encodes_and_decodes_with_the_bundled_model(capsys):
    assert cli.main(["tokenize", "--text", "In the beginning"]) == 0
    ids = capsys.readouterr().out.split()
    want = load_model(DEFAULT_MODEL).tokenizer.encode("In the beginning")
    assert [int(i) for i in ids] == want
    assert cli.main(["tokenize", "--decode", " ".join(ids), "--verbose"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "In the beginning" and len(lines) == 1 + len(ids)
    assert cli.main(["tokenize", "--decode", "[" + ", ".join(ids) + "]"]) == 0
    assert capsys.readouterr().out == "In the beginning\n"

"""Smoke tests of the `bitnet-jax` command line (bitnet_jax/cli.py).

The model is the tiny config widened to GPT-2's 50257-token vocabulary, saved as an HF folder
with save_hf, next to GPT-2's vocab.json/merges.txt from ../shared/data (copied into tmp, never
into the project). These tests skip when the shared data is absent.
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

from bitnet_jax.cli import main as cli
from bitnet_jax.formats.hf import save_hf
from bitnet_jax.model.config import load_config
from bitnet_jax.runtime.generate import generate, stream
from bitnet_jax.formats.loader import load_model
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
    monkeypatch.setattr(cli, "DEFAULT_MODEL", tmp_path / "default.gguf")
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
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_infer", interrupted)
    assert cli.main(["infer", "--prompt", "x"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_delegated_commands_pass_argv_through(monkeypatch, capsys):
    seen = {}
    fake = type(sys)("fake_commands")
    fake.run_main = lambda argv: seen.setdefault("argv", argv) and 3
    monkeypatch.setitem(sys.modules, "fake_commands", fake)
    monkeypatch.setitem(cli.DELEGATED, "train", (("fake_commands", "run_main"),))
    assert cli.main(["train", "--config", "x.json", "--steps=2"]) == 3
    assert seen["argv"] == ["--config", "x.json", "--steps=2"]

    monkeypatch.setitem(cli.DELEGATED, "train", (("bitnet_jax.no_such_module", "train_main"),))
    assert cli.main(["train"]) == 1
    assert "not available" in capsys.readouterr().err
    assert cli.main(["inspect", "--help"]) == 0  # the real command, its own argparse


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

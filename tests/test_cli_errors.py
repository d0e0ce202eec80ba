"""How the `bitnet-jax` command line fails (issue 12): one `error:` line on stderr and exit 1 for
a user error, one line and exit 2 for bad arguments, 130 and no traceback for Ctrl-C at any
moment. Most tests run main() in-process on the bundled default model (512-token context); the
Ctrl-C and raw-bytes tests start the real program.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bitnet_jax
from bitnet_jax.cli import bench as bench_command
from bitnet_jax.cli import common
from bitnet_jax.cli import main as cli
from bitnet_jax.errors import BitNetError
from conftest import ROOT

CONSOLE_SCRIPT = Path(sys.executable).with_name("bitnet-jax")


def _one_error_line(capsys) -> str:
    """stderr must be exactly one `error: ...` line; returns it."""
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err
    return captured.err


def _program(*args, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **kwargs.pop("env", {}))
    return subprocess.Popen([sys.executable, "-m", "bitnet_jax", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


# ------------------------------------------------------------------------------------------------
# 1. --version


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"bitnet-jax {bitnet_jax.__version__}\n"


def test_version_and_help_import_no_jax():
    code = ("import sys; from bitnet_jax.cli.main import main; "
            "assert main(['--version']) == 0 and main(['--help']) == 0; "
            "assert 'jax' not in sys.modules, 'jax was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("bitnet-jax ")


# ------------------------------------------------------------------------------------------------
# 2. Text that is not UTF-8


@pytest.mark.parametrize("argv, flag", [
    (["infer", "--prompt", "caf\udcc3"], "--prompt"),
    (["infer", "--prompt", "x", "--chat", "--system", "\udcff"], "--system"),
    (["tokenize", "--text", "\udcff"], "--text"),
])
def test_arguments_that_are_not_utf8_are_one_error(argv, flag, capsys):
    assert cli.main(argv) == 1
    err = _one_error_line(capsys)
    assert f"{flag} is not valid UTF-8" in err and "byte 0x" in err


def test_raw_bytes_on_the_real_command_line():
    proc = _program("infer", "--prompt", b"\xff", "--max-tokens", "1")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and out == b""
    assert err.decode().splitlines() == [
        "error: --prompt is not valid UTF-8 (byte 0xff at character 0); pass UTF-8 text or "
        "--prompt-file PATH."]


# ------------------------------------------------------------------------------------------------
# 3. convert into a folder that does not exist


def test_convert_into_a_missing_folder(tmp_path, capsys):
    dst = tmp_path / "missing_dir" / "x.gguf"
    assert cli.main(["convert", str(common.resolve_model(None)), str(dst)]) == 1
    err = _one_error_line(capsys)
    assert "missing_dir" in err and "does not exist" in err
    assert list(tmp_path.iterdir()) == []


def test_convert_onto_a_folder_or_its_source(tmp_path, capsys):
    src = str(common.resolve_model(None))
    assert cli.main(["convert", src, str(tmp_path)]) == 1
    assert "is a folder" in _one_error_line(capsys)
    assert cli.main(["convert", src, src]) == 1
    assert "is the source file" in _one_error_line(capsys)


# ------------------------------------------------------------------------------------------------
# 4. bench longer than the context


def test_bench_longer_than_the_context_is_refused_before_loading(monkeypatch, capsys):
    def no_loading(args):
        raise AssertionError("the weights were loaded before the context check")

    monkeypatch.setattr(common, "load_model_from_args", no_loading)
    assert cli.main(["bench", "--prompt-tokens", "500", "--gen-tokens", "100"]) == 1
    err = _one_error_line(capsys)
    assert "512" in err and "--prompt-tokens" in err and "--gen-tokens" in err


def test_bench_context_check_after_loading_uses_cli_words(monkeypatch, capsys):
    monkeypatch.setattr(bench_command, "_peek_context", lambda path: None)
    assert cli.main(["bench", "--prompt-tokens", "500", "--gen-tokens", "100",
                     "--backend", "cpu"]) == 1
    err = _one_error_line(capsys)
    assert "512" in err and "--prompt-tokens" in err and "prompt_tokens" not in err


def test_bench_flags_have_help(capsys):
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for text in ("tokens in each random prompt", "tokens to generate per prompt",
                 "prompts run together"):
        assert text in out


# ------------------------------------------------------------------------------------------------
# 5. CLI words, not Python words


def test_a_prompt_longer_than_the_context_names_truncate(capsys):
    long = "word " * 2000
    assert cli.main(["infer", "--prompt", long, "--max-tokens", "1", "--backend", "cpu"]) == 1
    err = _one_error_line(capsys)
    assert "--truncate" in err and "truncate=True" not in err
    assert cli.main(["infer", "--prompt", long, "--max-tokens", "2", "--truncate",
                     "--backend", "cpu"]) == 0
    assert "finish=length" in capsys.readouterr().err


def test_system_without_chat_names_the_flag(capsys):
    assert cli.main(["infer", "--prompt", "x", "--system", "be brief"]) == 1
    err = _one_error_line(capsys)
    assert "--chat" in err and "chat=True" not in err


def test_cli_message_is_printed_instead_of_the_api_wording(monkeypatch, capsys):
    fake = type(sys)("bitnet_jax.cli.perplexity")

    def fail(argv):
        raise BitNetError("pass truncate=True", cli_message="pass --truncate")

    fake.main = fail
    monkeypatch.setitem(sys.modules, "bitnet_jax.cli.perplexity", fake)
    assert cli.main(["perplexity"]) == 1
    assert _one_error_line(capsys) == "error: pass --truncate\n"


# ------------------------------------------------------------------------------------------------
# 6. tokenize: missing files, decoding


def test_tokenize_missing_file_is_reported_as_missing(tmp_path, capsys):
    assert cli.main(["tokenize", "--file", str(tmp_path / "nope.txt")]) == 1
    err = _one_error_line(capsys)
    assert "does not exist" in err and "UTF-8 (" not in err


def test_tokenize_decode_errors(capsys):
    assert cli.main(["tokenize", "--decode", "1 x"]) == 2
    assert "--decode" in _one_error_line(capsys)
    assert cli.main(["tokenize", "--decode", "999999"]) == 1
    assert "outside the vocabulary" in _one_error_line(capsys)


def test_tokenize_reads_stdin(capsys, monkeypatch):
    assert cli.main(["tokenize", "--text", "In the beginning"]) == 0
    want = capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.StringIO("In the beginning"))
    assert cli.main(["tokenize", "--text", "-"]) == 0
    assert capsys.readouterr().out == want


# ------------------------------------------------------------------------------------------------
# 7, 8. Argument errors: one line, exit 2


@pytest.mark.parametrize("flag, value", [
    ("--temperature", "inf"), ("--temperature", "nan"), ("--temperature", "-1"),
    ("--top-p", "0"), ("--top-p", "1.5"), ("--min-p", "1"), ("--min-p", "-0.1"),
    ("--repeat-penalty", "0"), ("--repeat-penalty", "inf"), ("--top-k", "-1"),
    ("--max-tokens", "x"), ("--seed", str(2**32)),
])
def test_bad_sampling_values_are_refused_while_parsing(flag, value, capsys):
    assert cli.main(["infer", "--prompt", "x", f"{flag}={value}"]) == 2
    err = _one_error_line(capsys)
    assert f"argument {flag}: " in err and repr(value) in err


@pytest.mark.parametrize("argv", [
    [], ["no-such-command"], ["--bogus"], ["infer"], ["infer", "--prompt", "x", "--bogus"],
    ["infer", "--prompt", "x", "--prompt-file", "y"], ["bench", "--batch", "0"],
    ["bench", "--batch", "65"], ["chat", "--backend", "tpu"], ["tokenize"],
    ["tokenize", "--text", "a", "--decode", "1"], ["convert", "only-src"], ["inspect"],
])
def test_argument_errors_are_one_line(argv, capsys):
    assert cli.main(argv) == 2
    err = _one_error_line(capsys)
    assert err.rstrip().endswith("--help`)") and "usage:" not in err


@pytest.mark.parametrize("command", list(cli.COMMANDS) + list(cli.ALIASES))
def test_every_command_has_help(command, capsys):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: bitnet-jax {cli.ALIASES.get(command, command)}")


def test_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in cli.COMMANDS)


# ------------------------------------------------------------------------------------------------
# 9. --prompt - and --prompt-file


def test_prompt_file_errors(tmp_path, capsys):
    assert cli.main(["infer", "--prompt-file", str(tmp_path / "nope.txt")]) == 1
    assert "--prompt-file" in (err := _one_error_line(capsys)) and "does not exist" in err
    assert cli.main(["infer", "--prompt-file", str(tmp_path)]) == 1
    assert "is a folder" in _one_error_line(capsys)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    assert cli.main(["infer", "--prompt-file", str(bad)]) == 1
    assert "is not valid UTF-8 (byte 0xe9 at offset 3)" in _one_error_line(capsys)


def test_prompt_from_stdin_that_is_not_utf8(capsys, monkeypatch):
    stdin = io.TextIOWrapper(io.BytesIO(b"\xff\xfe"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert cli.main(["infer", "--prompt", "-"]) == 1
    assert "stdin" in (err := _one_error_line(capsys)) and "not valid UTF-8" in err


def test_chat_line_that_is_not_utf8_is_refused_and_the_chat_goes_on(capsys, monkeypatch):
    stdin = io.TextIOWrapper(io.BytesIO(b"\xff\n/exit\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert cli.main(["chat", "--backend", "cpu"]) == 0
    assert "error: that line is not valid UTF-8" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# 10. --model defaults to the bundled model


def test_resolve_model_defaults_to_the_bundled_model():
    from bitnet_jax.formats.loader import DEFAULT_MODEL

    assert common.resolve_model(None) == DEFAULT_MODEL
    assert common.resolve_model("~/m.gguf") == Path("~/m.gguf").expanduser()


# ------------------------------------------------------------------------------------------------
# 11. Ctrl-C at any moment


@pytest.mark.parametrize("launcher", ["python -m", "console script"])
@pytest.mark.parametrize("command, delay", [
    (["infer", "--prompt", "hi", "--max-tokens", "400"], 0.3),  # while JAX imports
    (["infer", "--prompt", "hi", "--max-tokens", "400"], 1.5),  # loading or compiling
    (["bench", "--prompt-tokens", "256", "--gen-tokens", "256", "--batch", "64"], 1.5),
])
def test_ctrl_c_exits_130_without_a_traceback(launcher, command, delay, tmp_path):
    if launcher == "console script" and not CONSOLE_SCRIPT.exists():
        pytest.skip(f"{CONSOLE_SCRIPT} is not installed")
    # A fresh compile cache, so compiling keeps the run busy past the signal.
    env = dict(os.environ, PYTHONPATH=str(ROOT), BITNET_JAX_CACHE_DIR=str(tmp_path))
    prefix = [sys.executable, "-m", "bitnet_jax"] if launcher == "python -m" else \
        [str(CONSOLE_SCRIPT)]
    proc = subprocess.Popen(prefix + command + ["--backend", "cpu"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    if proc.poll() is not None:
        out, err = proc.communicate()
        pytest.skip(f"the command ended before the signal (exit {proc.returncode}): {err[-200:]}")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "Exception ignored" not in err

"""What a person sees while rmconvert works: a byte bar on a terminal, plain lines otherwise, nothing under
--json; and no progress bars of transformers' in ``validate --load``."""

from __future__ import annotations

import errno
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from rmconvert.cli import cli


def rmconvert_script() -> str:
    """The installed ``rmconvert`` console script (run from the source tree, ``python -c`` would import the
    unbuilt package)."""
    script = Path(sys.executable).with_name("rmconvert")
    return str(script) if script.exists() else shutil.which("rmconvert")


def run_on_a_terminal(*args) -> tuple[int, str, str]:
    """Run the CLI in a subprocess whose stderr is a pseudo-terminal; (exit code, stdout, what the terminal got)."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([rmconvert_script(), *map(str, args)], stdout=subprocess.PIPE, stderr=terminal)
    os.close(terminal)
    seen = bytearray()
    while True:
        try:
            chunk = os.read(controller, 1 << 16)
        except OSError as exc:  # EIO: the other end closed
            if exc.errno != errno.EIO:
                raise
            break
        if not chunk:
            break
        seen += chunk
    os.close(controller)
    stdout, _ = proc.communicate(timeout=300)
    return proc.returncode, stdout.decode(), seen.decode().replace("\r\n", "\n")  # the terminal's newlines


def test_a_terminal_gets_a_byte_bar(build, tmp_path):
    code, stdout, terminal = run_on_a_terminal("convert", build("llama2", max_shard_size="100KB"), tmp_path / "rm")
    assert code == 0, terminal
    assert stdout == ""
    bar, _, rest = terminal.partition("\n")  # the bar redraws one line, then ends it for the summary
    assert bar.startswith("\r[") and "MiB" in bar
    final = bar.split("\r")[-1]
    assert final.startswith("[" + "#" * 30 + "] 100% ") and final.endswith(" MiB"), final
    assert "[1/" not in terminal  # no per-shard lines on a terminal
    assert rest.splitlines()[-1].startswith(f"{tmp_path / 'rm'}: LlamaForSequenceClassification")


def test_plain_lines_when_stderr_is_not_a_terminal(build, tmp_path):
    result = CliRunner().invoke(cli, ["convert", str(build("llama2", max_shard_size="100KB")), str(tmp_path / "rm")])
    assert result.exit_code == 0, result.stderr
    *progress, summary = result.stderr.splitlines()
    assert progress and all(line.startswith("[") and "/" in line for line in progress), result.stderr
    assert "\r" not in result.stderr and summary.startswith(str(tmp_path / "rm"))


def test_nothing_but_the_report_under_json(build, tmp_path):
    code, stdout, terminal = run_on_a_terminal("convert", build("llama2"), tmp_path / "rm", "--json")
    assert code == 0 and terminal == ""
    assert stdout.startswith("{")


def test_validate_load_shows_no_transformers_progress(build, tmp_path):
    runner = CliRunner()
    assert runner.invoke(cli, ["convert", str(build("llama2")), str(tmp_path / "rm")]).exit_code == 0
    result = runner.invoke(cli, ["validate", str(tmp_path / "rm"), "--load", "--against", str(build("llama2"))])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert result.stdout == f"{tmp_path / 'rm'}: valid (0 errors, 0 warnings)\n"


def test_validate_load_on_a_terminal_shows_only_the_report(build, tmp_path):
    """transformers draws its bars on a terminal's stderr: none may appear there either."""
    assert CliRunner().invoke(cli, ["convert", str(build("olmo2")), str(tmp_path / "rm")]).exit_code == 0
    code, stdout, terminal = run_on_a_terminal("validate", tmp_path / "rm", "--load")
    assert code == 0, stdout + terminal
    assert terminal == ""
    assert stdout == f"{tmp_path / 'rm'}: valid (0 errors, 0 warnings)\n"

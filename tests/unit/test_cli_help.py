"""Every command's --help renders (help text was once parsed as rich markup, where a
literal `[/tcp]` is a closing tag and made `torpor create --help` end in a traceback), and
usage errors read like torpor's own."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from torpor.cli.main import app, main


def _command_paths(group: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    # typer vendors its own click: a group is whatever has subcommands
    paths = []
    for name, command in group.commands.items():
        path = (*prefix, name)
        paths.append(path)
        if hasattr(command, "commands"):
            paths += _command_paths(command, path)
    return paths


COMMANDS = _command_paths(typer.main.get_command(app))


def test_the_cli_has_its_commands() -> None:
    assert ("create",) in COMMANDS and ("snapshot", "list") in COMMANDS


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_help_renders(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_a_commands_summary_is_its_docstrings_first_paragraph_on_one_line() -> None:
    """The docstring's line breaks (wrapped for the source) are not the terminal's: rich
    markup mode kept them, and the group's list broke mid-sentence."""
    result = CliRunner().invoke(app, ["snapshot", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert any("paused only while state and disk are taken. Its machine state is compressed"
               in line for line in result.output.splitlines()), result.output


@pytest.mark.parametrize(("argv", "line"), [
    (["create"], "missing argument 'NAME' (see `torpor create --help`)"),
    (["create", "x", "--cpus", "two"],
     "invalid value for '--cpus': 'two' is not a valid int (see `torpor create --help`)"),
    (["frobnicate"], "no such command 'frobnicate' (see `torpor --help`)"),
    (["--accel", "fast", "list"],
     "invalid value for --accel: must be auto, kvm or tcg (see `torpor --help`)"),
], ids=["missing", "bad-value", "no-command", "bad-global"])
def test_a_usage_error_is_one_line_like_torpors_own(argv: list[str], line: str,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["torpor", *argv])
    with pytest.raises(SystemExit) as exited:
        main()
    assert (exited.value.code, capsys.readouterr().err) == (2, f"torpor: error: {line}\n")


def test_a_bare_group_prints_its_help_and_no_error(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["torpor", "snapshot"])
    with pytest.raises(SystemExit) as exited:
        main()
    out, err = capsys.readouterr()
    assert (exited.value.code, err) == (2, "") and "push" in out

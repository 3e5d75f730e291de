"""README, man page and CI cannot drift from the code."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import typer

from llmsample.cli import app
from llmsample.errors import ExitCode

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MAN = (ROOT / "man" / "llmsample.1").read_text()


def quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", section, flags=re.S)


def test_quick_start_is_two_commands_and_ci_runs_the_test_one():
    commands = quick_start_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert "llmsample " in commands[0] and "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def all_options() -> set[str]:
    command = typer.main.get_command(app)
    names = set()
    for sub in [command, *command.commands.values()]:
        for param in sub.params:
            names.update(o for o in [*param.opts, *getattr(param, "secondary_opts", [])] if o.startswith("-"))
    return names


def test_every_option_is_in_the_man_page():
    man = MAN.replace("\\-", "-")
    missing = sorted(o for o in all_options() if o not in man)
    assert not missing, f"man/llmsample.1 lacks {missing}"


def test_every_command_is_in_the_man_page():
    for name in typer.main.get_command(app).commands:
        assert f"\\fB{name}\\fR" in MAN or f".B {name}" in MAN


def test_exit_codes_are_documented():
    for code in ExitCode:
        assert re.search(rf"^\| {int(code)} \|", README, flags=re.M), f"README lacks exit code {int(code)}"
        assert f".B {int(code)}\n" in MAN, f"man page lacks exit code {int(code)}"


@pytest.mark.skipif(not (shutil.which("groff") or shutil.which("mandoc")), reason="no groff or mandoc here")
def test_man_page_renders_without_warnings():
    if shutil.which("mandoc"):
        result = subprocess.run(["mandoc", "-T", "lint", "-W", "warning", str(ROOT / "man" / "llmsample.1")],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    else:
        result = subprocess.run(["groff", "-k", "-Tutf8", "-man", "-ww", "-z", str(ROOT / "man" / "llmsample.1")],
                                capture_output=True, text=True)
        assert result.returncode == 0 and not result.stderr, result.stderr


def test_the_man_page_sampling_options_are_the_registry():
    from llmsample import manpage

    assert manpage.rewrite(MAN) == MAN, "run: python -m llmsample.manpage"


@pytest.mark.parametrize("command", ["generate", "inspect", "sweep"])
def test_help_keeps_its_defaults_and_ranges(cli, command):
    """rich reads "[default: 1.0]" as markup and drops it, leaving "reaching mass p ]." behind: escaped, it stays."""
    code, out, _ = cli(command, "--help")
    assert code == 0
    text = " ".join(out.replace("│", " ").split())
    assert " ]." not in text and " ." not in text.replace(" .text", "").replace(" .gguf", "")
    if command == "generate":
        assert "[default: 128]" in text and "[default: 1; > 0; 1.0 = off]" in text

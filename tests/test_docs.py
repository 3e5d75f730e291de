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


def all_commands() -> list[tuple[list[str], object]]:
    """Every command and group, with the words that call it: ``([], app)``, ``(["presets", "show"], …)``."""
    found = []

    def walk(words: list[str], command: object) -> None:
        found.append((words, command))
        for name, sub in getattr(command, "commands", {}).items():
            walk([*words, name], sub)

    walk([], typer.main.get_command(app))
    return found


def shows_a_default(option: object) -> bool:
    """Whether an option's help should carry "[default: …]": Typer's own, or one written into the help text."""
    if "\\[default:" in (option.help or ""):
        return True
    return bool(option.show_default) and option.default is not None and not option.is_flag


@pytest.mark.parametrize("words", [" ".join(words) for words, _ in all_commands()])
def test_help_keeps_every_default_and_range(cli, monkeypatch, words):
    """rich reads "[default: 1.0]" or "llmsample[plot]" as markup and drops it ("reaching mass p ]."): every
    option's help must come out whole, with as many defaults as the options declare."""
    monkeypatch.setenv("COLUMNS", "400")  # one line per option: the help text is not wrapped apart
    command = dict((" ".join(w), c) for w, c in all_commands())[words]
    code, out, _ = cli(*words.split(), "--help")
    assert code == 0
    text = " ".join(out.replace("│", " ").split())
    assert " ]." not in text and "[]" not in text
    options = [p for p in command.params if p.param_type_name == "option" and p.name != "help" and not p.hidden]
    for option in options:
        assert " ".join(option.help.replace("\\[", "[").split()) in text, f"{option.opts[0]}'s help lost text"
    assert text.count("[default:") == sum(shows_a_default(o) for o in options), "a default was lost"
    if words == "generate":
        assert "[default: 128]" in text and "[default: 1; > 0; 1.0 = off]" in text
        assert "[default: 1; (0, 1]; 1.0 = off; repeatable" not in text
    if words == "inspect":  # a repeatable flag keeps its default and range
        assert "(repeatable: one value per variant) [default: 1; (0, 1]; 1.0 = off]" in text


def test_every_readme_table_has_rows():
    """A table's header and rule with nothing under them (a re-measured table whose rows were lost) is caught."""
    lines = README.splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.startswith("|") and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1].strip()):
            below = lines[i + 2] if i + 2 < len(lines) else ""
            assert below.startswith("|"), f"README line {i + 1}: a table with no rows ({line[:60]})"

"""explore's full-screen program: every key driven with Textual's Pilot (80×24 and a wide terminal), then the
real command in a pseudo-terminal (Ctrl-C restores the terminal; ``q`` prints the text on stdout)."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

pytest.importorskip("textual")

from llmsample import chat, models, presets, run  # noqa: E402
from llmsample.explore.app import ExploreApp, edit_flags  # noqa: E402
from llmsample.explore.stepper import Explorer  # noqa: E402

PROMPT = "The quick brown"
SIZES = [(80, 24), (160, 50)]


@pytest.fixture(scope="module")
def lm(tiny_gemma_dir):
    return models.load(str(tiny_gemma_dir))


def configure_from(base: list[str]):
    """What the command line gives the program: the settings with ``e``'s flags added (the real parser)."""
    from llmsample.cli import settings_with

    return lambda extra: settings_with("explore", [PROMPT, *base], extra, None)


def new_app(lm, *flags: str, ignore_eos: bool = False) -> ExploreApp:
    base = ["--no-model-defaults", "--max-new-tokens", "12", "--seed", "1", *flags]
    configure = configure_from(base)
    prompt = chat.prepare(lm.tokenizer, lm.name, PROMPT, False)
    explorer = Explorer(lm, prompt.ids, configure([]), seed=1, eos=run.eos_ids(lm), prompt_text=PROMPT,
                        ignore_eos=ignore_eos)
    return ExploreApp(explorer, configure)


def drive(app: ExploreApp, size: tuple[int, int], script) -> None:
    """Run ``app`` headless at ``size`` and let ``script(pilot)`` press keys."""

    async def go() -> None:
        async with app.run_test(size=size) as pilot:
            await pilot.pause()
            await script(pilot)

    asyncio.run(go())


async def until_stopped(app: ExploreApp) -> None:
    """Wait for ``a`` to stop (its steps run on the event loop, between the keys)."""
    while app.running:
        await asyncio.sleep(0.01)


def screen_text(app: ExploreApp) -> str:
    """What the screen shows, as text (the SVG export holds every character drawn)."""
    import html
    import re

    svg = app.export_screenshot()
    return html.unescape(re.sub(r"<[^>]+>", "", svg)).replace("\xa0", " ")


@pytest.mark.parametrize("size", SIZES)
def test_every_key(lm, tmp_path, size):
    app = new_app(lm, "--sample")
    e = app.explorer
    seen: dict = {}

    async def script(pilot):
        await pilot.press("enter", "space")
        assert [s.how for s in e.branch.steps] == ["sampled", "sampled"]
        table = e.preview()["candidates"]
        await pilot.press("3")
        assert e.branch.steps[-1].how == "chosen" and e.branch.steps[-1].token_id == table[2]["token_id"]
        await pilot.press("9")
        assert len(e.branch.steps) == 4
        await pilot.press("u")
        await pilot.press("backspace")
        assert len(e.branch.steps) == 2
        await pilot.press("b")
        assert (len(e.branches), e.current, e.branch.fork_step) == (2, 1, 2)
        await pilot.press("1")
        await pilot.press("tab")
        assert e.current == 0 and len(e.branch.steps) == 2
        await pilot.press("tab")
        assert e.current == 1 and len(e.branch.steps) == 3
        # e: a setting; the table is recomputed from the logits there, no forward pass.
        forwards = e.forwards
        await pilot.press("e")
        await pilot.press(*"top_k 2", "enter")
        assert e.forwards == forwards and e.settings.sampling.top_k == 2
        assert e.preview()["kept"] == [2]
        assert app.last_redraw_ms is not None and app.last_redraw_ms <= 50
        seen["after_edit"] = screen_text(app)
        await pilot.press("e")
        await pilot.press(*"preset creative", "enter")
        assert e.settings.sampling.temperature == 1.2 and e.settings.sampling.top_k == 100
        await pilot.press("e")
        await pilot.press(*"top_k lots", "enter")
        assert "top-k" in app.message.plain and e.settings.sampling.top_k == 100  # refused, the settings kept
        # a: runs on to the token limit (12), then says why it stopped.
        await pilot.press("a")
        await until_stopped(app)
        await pilot.pause()
        assert len(e.branch.steps) == 12 and e.finished() == "length"
        assert "stopped: length" in app.message.plain
        seen["at_limit"] = screen_text(app)
        # s: saves where asked.
        await pilot.press("s")
        await pilot.press("end", "ctrl+u")  # clear what is offered
        await pilot.press(*str(tmp_path / "s.json"), "enter")
        assert app.saved == str(tmp_path / "s.json")
        await pilot.press("q")

    drive(app, size, script)
    assert app.return_value == e.text()
    data = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    assert data["type"] == "explore_session" and len(data["branches"]) == 2 and data["current_branch"] == 1
    screen = seen["at_limit"]
    for label in ("sample", "take", "run on", "undo", "branch", "next branch", "edit", "save", "quit"):
        assert label in screen  # the footer shows every key, at 80 columns too
    assert "token limit (12) is reached" in screen and "branch 2/2" in screen
    assert "table recomputed in" in seen["after_edit"] and "cut by top_k" in seen["after_edit"]


def test_any_key_pauses_a_run_on(lm):
    app = new_app(lm, "--sample", "--max-new-tokens", "5000", "--ignore-eos", ignore_eos=True)
    e = app.explorer

    async def script(pilot):
        await pilot.press("a")
        while len(e.branch.steps) < 3:
            await asyncio.sleep(0.01)
        await pilot.press("x")  # a key bound to nothing
        await until_stopped(app)
        await pilot.pause()
        paused_at = len(e.branch.steps)
        assert not app.running and app.message.plain == "paused" and paused_at < 5000
        await pilot.press("a")
        while len(e.branch.steps) < paused_at + 2:
            await asyncio.sleep(0.01)
        await pilot.press("u")  # a bound key pauses too, and does nothing else
        await until_stopped(app)
        await pilot.pause()
        assert not app.running and len(e.branch.steps) >= paused_at + 2
        await pilot.press("q")

    drive(app, (80, 24), script)


def test_ctrl_c_leaves_with_130_and_no_text(lm):
    app = new_app(lm)

    async def script(pilot):
        await pilot.press("enter", "ctrl+c")

    drive(app, (80, 24), script)
    assert app.return_code == 130 and app.return_value is None


def test_escape_cancels_an_edit(lm):
    app = new_app(lm)

    async def script(pilot):
        await pilot.press("e", *"top_k 3", "escape")
        assert app.explorer.settings.sampling.top_k == 0
        await pilot.press("q")

    drive(app, (80, 24), script)


@pytest.mark.parametrize("line, flags", [
    ("temperature 0.5", ["--temperature", "0.5"]),
    ("top_p=0.9", ["--top-p", "0.9"]),
    ("preset creative", ["--preset", "creative"]),
    ("max_new_tokens 300", ["--max-new-tokens", "300"]),
])
def test_edit_lines_become_flags(line, flags):
    assert edit_flags(line) == flags


def test_an_unknown_edit_names_the_key():
    from llmsample.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^e: unknown setting 'top_q' \(did you mean 'top_p'\?\)$"):
        edit_flags("top_q 0.5")
    with pytest.raises(ConfigError, match="give a setting and its value"):
        edit_flags("temperature")


# ---- the real command in a pseudo-terminal ---------------------------------------------------------------------


def _in_pty(args: list[str], keys: list[bytes], stdout_pipe: bool = False):
    """Run llmsample on a pseudo-terminal (stdin and stderr; stdout too unless ``stdout_pipe``), wait for the
    screen, type ``keys``; return (exit code, stdout bytes when piped, terminal output, the terminal's modes
    before and after)."""
    import pty
    import select
    import subprocess
    import termios
    import time

    master, slave = pty.openpty()
    termios.tcsetattr(slave, termios.TCSANOW, termios.tcgetattr(slave))
    before = termios.tcgetattr(slave)
    env = {**os.environ, "LANG": "C.UTF-8", "TERM": "xterm-256color", "COLUMNS": "80", "LINES": "24",
           "OMP_NUM_THREADS": "1"}
    env.pop("LC_ALL", None)
    proc = subprocess.Popen([sys.executable, "-m", "llmsample", *args], stdin=slave, stderr=slave,
                            stdout=subprocess.PIPE if stdout_pipe else slave, env=env, start_new_session=True)
    import fcntl
    import struct

    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    seen = b""

    def read_for(seconds: float, until: bytes = b"") -> None:
        nonlocal seen
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    seen += os.read(master, 65536)
                except OSError:
                    return
            if until and until in seen:
                return

    read_for(90, until=b"quit")  # the footer is drawn: the program is up
    for key in keys:
        os.write(master, key)
        read_for(0.5)
    out = proc.stdout.read() if stdout_pipe else b""
    code = proc.wait(timeout=60)
    read_for(0.3)
    after = termios.tcgetattr(slave)
    os.close(master)
    os.close(slave)
    return code, out, seen, before, after


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX terminals")
def test_ctrl_c_in_a_real_terminal_restores_it(tiny_gemma_dir):
    code, _, seen, before, after = _in_pty(["explore", PROMPT, "-m", str(tiny_gemma_dir), "--max-new-tokens", "5"],
                                           [b"\r", b"\x03"])
    assert code == 130
    assert b"\x1b[?1049h" in seen and b"\x1b[?1049l" in seen  # into the alternate screen and out of it
    assert after == before  # echo, canonical input, … as they were
    assert seen.rstrip().endswith(b"llmsample: error: interrupted")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX terminals")
def test_q_prints_the_text_on_stdout_as_in_a_command_substitution(tiny_gemma_dir):
    code, out, seen, before, after = _in_pty(
        ["explore", PROMPT, "-m", str(tiny_gemma_dir), "--max-new-tokens", "5", "--greedy"],
        [b"\r", b" ", b"q"], stdout_pipe=True)
    assert code == 0 and after == before
    lm = models.load(str(tiny_gemma_dir))
    from llmsample.decode import sample_loop
    from llmsample.sampling import Sampler
    import torch

    ids = chat.prepare(lm.tokenizer, lm.name, PROMPT, False).ids
    greedy = presets.resolve_settings(None, {"sampling": {"do_sample": False}}, {}).sampling
    tokens = [int(s.token_ids[0]) for s in sample_loop(lm.language_model, torch.tensor([ids]), Sampler(greedy), 2)]
    from llmsample.token_text import decode_text

    assert out.decode() == decode_text(lm.tokenizer, tokens) + "\n"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX terminals")
def test_format_json_prints_the_session_and_stats_go_to_the_terminal(tiny_chat_dir):
    code, out, seen, before, after = _in_pty(
        ["explore", PROMPT, "-m", str(tiny_chat_dir), "--chat", "--max-new-tokens", "5", "--seed", "4",
         "--format", "json", "--stats"], [b"\r", b"b", b"2", b"q"], stdout_pipe=True)
    assert code == 0 and after == before
    data = json.loads(out)
    lm = models.load(str(tiny_chat_dir))
    assert data["type"] == "explore_session" and data["seed"] == 4
    assert data["prompt"] == PROMPT  # as given; the ids are the rendered template's
    assert data["prompt_ids"] == chat.prepare(lm.tokenizer, lm.name, PROMPT, True).ids
    assert [len(b["steps"]) for b in data["branches"]] == [1, 2] and data["current_branch"] == 1
    assert b"forward passes in" in seen  # --stats, on the terminal (stderr) after the screen is gone

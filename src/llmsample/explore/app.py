"""The full-screen program of ``explore`` (Textual): the text so far, the next step's candidates, keys in a footer.

Textual draws on stderr and reads the keys from stdin's terminal, so stdout stays free for the answer (``q`` prints
the current branch's text there after the screen is gone: ``$(llmsample explore …)`` works). The model runs on the
event loop's thread, a step at a time (tens of milliseconds); ``a`` (run on) schedules each step on a timer, so
the keys pressed meanwhile are read between steps and any of them pauses it.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from rich.console import Group
from rich.text import Text
from textual import events
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Input, Static

from llmsample import render
from llmsample.errors import ConfigError, LlmsampleError, first_line
from llmsample.explore import session_file
from llmsample.explore.stepper import CHOSEN, FORCED, Explorer, LimitReached

# ``configure(flags)``: the settings with these command-line flags added (``e``), checked as the command line is.
Configure = Callable[[list[str]], Any]

EDIT_HELP = ("a setting and its value: temperature 0.7 · top_k 40 · top_p 0.9 · min_p 0.05 · any stage's field · "
             "max_new_tokens 200 · stop TEXT · seed N · preset NAME (Esc: cancel)")
INTERRUPTED = 130
RUN_ON_REDRAW_S = 0.25  # while a runs on, the screen is drawn at most this often
STEP_GAP_S = 0.001  # between two steps of a run on: the event loop reads keys and paints


class Ask(ModalScreen[Optional[str]]):
    """One line of input over the main screen: Enter gives it, Esc gives None."""

    BINDINGS = [Binding("escape", "cancel", "cancel")]
    DEFAULT_CSS = """
    Ask { align: center bottom; }
    Ask > Static { width: 100%; background: $panel; padding: 0 1; }
    Ask > Input { width: 100%; }
    """

    def __init__(self, label: str, value: str = "", placeholder: str = ""):
        super().__init__()
        self.label, self.value, self.placeholder = label, value, placeholder

    def compose(self) -> ComposeResult:
        yield Static(self.label)
        yield Input(value=self.value, placeholder=self.placeholder)

    def on_input_submitted(self, message: Input.Submitted) -> None:
        self.dismiss(message.value)

    def action_cancel(self) -> None:
        self.dismiss(None)


class Main(Screen):
    """The text, a status line, the next step's table, the footer. Every key of the issue is bound here."""

    BINDINGS = [
        # Tab first: it replaces Screen's own tab binding, which keeps its place at the front of the footer.
        Binding("tab", "next_branch", "next branch", key_display="tab"),
        Binding("enter", "sample", "sample", key_display="⏎"),
        Binding("space", "sample", "sample", show=False),
        Binding("1", "choose(0)", "take", key_display="1-9"),
        *[Binding(str(n), f"choose({n - 1})", "take", show=False) for n in range(2, 10)],
        Binding("a", "run_on", "run on"),
        Binding("u", "undo", "undo"),
        Binding("backspace", "undo", "undo", show=False),
        Binding("b", "fork", "branch"),
        Binding("e", "edit", "edit"),
        Binding("s", "save", "save"),
        Binding("q", "quit_with_text", "quit"),
    ]
    DEFAULT_CSS = """
    #text-scroll { height: 1fr; min-height: 3; border: round $primary-darken-2; padding: 0 1; }
    #status { height: auto; padding: 0 1; background: $panel; }
    #table { height: auto; padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="text-scroll"):
            yield Static(id="text")
        yield Static(id="status")
        yield Static(id="table")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.app.redraw()  # type: ignore[attr-defined]

    def on_key(self, event: events.Key) -> None:
        """While ``a`` runs on, any key pauses it (and does nothing else)."""
        app: ExploreApp = self.app  # type: ignore[assignment]
        if app.running:
            app.pause()
            event.stop()
            event.prevent_default()

    # Each action first pauses a run-on (the key that pauses does nothing else).
    def action_sample(self) -> None:
        self.app.act(lambda e: e.sample())  # type: ignore[attr-defined]

    def action_choose(self, row: int) -> None:
        self.app.act(lambda e: e.choose(row))  # type: ignore[attr-defined]

    def action_run_on(self) -> None:
        self.app.start_run_on()  # type: ignore[attr-defined]

    def action_undo(self) -> None:
        self.app.act(lambda e: e.undo())  # type: ignore[attr-defined]

    def action_fork(self) -> None:
        self.app.act(lambda e: e.fork())  # type: ignore[attr-defined]

    def action_next_branch(self) -> None:
        self.app.act(lambda e: e.switch())  # type: ignore[attr-defined]

    def action_edit(self) -> None:
        self.app.edit()  # type: ignore[attr-defined]

    def action_save(self) -> None:
        self.app.save()  # type: ignore[attr-defined]

    def action_quit_with_text(self) -> None:
        self.app.finish()  # type: ignore[attr-defined]


class ExploreApp(App[Optional[str]]):
    """``run()`` returns the current branch's text on ``q``; ``return_code`` is 130 after Ctrl-C."""

    TITLE = "llmsample explore"
    BINDINGS = [Binding("ctrl+c", "interrupt", "interrupt", show=False, priority=True)]
    ENABLE_COMMAND_PALETTE = False

    def __init__(self, explorer: Explorer, configure: Optional[Configure] = None,
                 save_path: str = "explore-session.json"):
        super().__init__()
        self.explorer = explorer
        self.configure = configure
        self.save_path = save_path
        self.message: Text = Text("")
        self.running = False
        self._pause_asked = False  # a key was pressed while a ran on
        self._drawn = 0.0  # when a run on last drew the screen
        self.last_redraw_ms: Optional[float] = None  # the last setting change: new table, drawn
        self.saved: Optional[str] = None

    def on_mount(self) -> None:
        self.push_screen(Main())

    # ---- drawing -------------------------------------------------------------------------------------------

    def redraw(self) -> None:
        """Draw the text, the status line and the next step's table from the explorer's state."""
        screen = self.screen
        if not isinstance(screen, Main):
            screen = next((s for s in self.screen_stack if isinstance(s, Main)), None)
            if screen is None:
                return
        e = self.explorer
        screen.query_one("#text", Static).update(self.text_view())
        screen.query_one("#status", Static).update(self.status_view())
        title = f"step {e.index + 1} · its candidates (1-9 takes one)"
        reason = e.finished()
        if reason == "length":
            title = (f"the token limit ({e.max_new_tokens}) is reached: u undoes, "
                     f"e max_new_tokens N raises it")
        elif reason:
            title += f" · the branch has ended ({'end of text' if reason == 'eos' else 'a stop string'}): " \
                     "⏎ and 1-9 go on all the same"
        table = render.candidate_table(e.preview(), title, numbered=True)
        table.title = None  # drawn above as a line of its own: a title is wrapped to the table's width
        box = screen.query_one("#table", Static)
        width = box.content_size.width or self.size.width
        box.update(flatten(Group(Text(title, style="bold"), table), width))
        screen.query_one("#text-scroll", VerticalScroll).scroll_end(animate=False)

    def text_view(self) -> Text:
        """The prompt (dim) and the branch's tokens coloured by probability as generate colours them; a token
        picked by hand is underlined, a forced one reversed."""
        e = self.explorer
        text = Text(e.prompt_text, style="dim")
        for step in e.branch.steps:
            style = render.style_for(step.prob)
            if step.how == CHOSEN:
                style += " underline"
            elif step.how == FORCED:
                style += " reverse"
            text.append(step.text, style=style.strip() or None)
        if e.finished() == "eos":
            text.append(" ⏹ end of text", style="dim italic")
        return text

    def status_view(self) -> Group:
        e = self.explorer
        line = Text()
        line.append(f"branch {e.current + 1}/{len(e.branches)}", style="bold")
        if e.branch.parent is not None:
            line.append(f" (from branch {e.branch.parent + 1} at step {e.branch.fork_step + 1})", style="dim")
        line.append(f" · {e.index}/{e.max_new_tokens} tokens · {e.settings.sampling.describe_chain()}")
        if e.branch.steps:
            last = e.branch.steps[-1]
            line.append(f" · last: {last.how} {render.token_label(last.text, 16)} raw {render._pct(last.raw_prob)}%"
                        f" final {render._pct(last.prob)}%")
        return Group(line, self.message) if self.message.plain else Group(line)

    def say(self, message: str, style: str = "") -> None:
        self.message = Text(message, style=style or "italic")

    # ---- acting --------------------------------------------------------------------------------------------

    def pause(self) -> None:
        """Stop a run-on after its current step."""
        self._pause_asked = True

    def act(self, what: Callable[[Explorer], Any]) -> None:
        """Do one thing to the explorer and redraw; an error becomes the status message."""
        if self.running:
            self.pause()
            return
        self.message = Text("")
        try:
            what(self.explorer)
        except LimitReached as exc:
            self.say(str(exc), "yellow")
        except IndexError as exc:
            self.say(f"no such candidate: {exc}", "yellow")
        except LlmsampleError as exc:
            self.say(first_line(exc), "red")
        self.redraw()

    def start_run_on(self) -> None:
        """``a``: take sampled tokens until EOS, a stop string or the token limit; any key pauses."""
        if self.running:
            self.pause()
            return
        reason = self.explorer.finished()
        if reason:
            self.say(f"the branch has ended ({reason}): undo, take a token, or raise the limit with e", "yellow")
            self.redraw()
            return
        self.running = True
        self._pause_asked = False
        self.say("running on: any key pauses")
        self.redraw()
        self._drawn = time.perf_counter()
        self.set_timer(STEP_GAP_S, self._run_on_step)

    def _run_on_step(self) -> None:
        """One step of ``a``, then the next on a timer: keys pressed meanwhile are read between steps (the event
        loop runs in between), and the model runs on this thread as for Enter (a worker thread made each step
        about 10% slower on two cores)."""
        if self._pause_asked:
            self._run_on_done("paused")
            return
        e = self.explorer
        try:
            e.sample()
        except LimitReached:
            self._run_on_done("stopped: length")
            return
        except LlmsampleError as exc:
            self._run_on_done(first_line(exc))
            return
        reason = e.finished()
        if reason:
            self._run_on_done(f"stopped: {reason}")
            return
        # Drawing the screen costs a good part of a token on the CPU: a few times a second is enough to watch the
        # text grow, and keeps a run on about as fast as generate.
        if time.perf_counter() - self._drawn >= RUN_ON_REDRAW_S:
            self.redraw()
            self._drawn = time.perf_counter()
        self.set_timer(STEP_GAP_S, self._run_on_step)

    def _run_on_done(self, why: str) -> None:
        self.running = False
        self.say(why)
        self.redraw()

    def edit(self) -> None:
        """``e``: change a setting; the current step's table is recomputed from the logits already there."""
        if self.running:
            self.pause()
            return
        if self.configure is None:
            self.say("settings cannot be changed in this session", "yellow")
            self.redraw()
            return
        self.push_screen(Ask(EDIT_HELP, placeholder="temperature 0.5"), self._edited)

    def _edited(self, line: Optional[str]) -> None:
        if not line or not line.strip():
            return
        try:
            flags = edit_flags(line)
            settings = self.configure(flags)  # type: ignore[misc]
        except ConfigError as exc:
            self.say(first_line(exc), "red")
            self.redraw()
            return
        start = time.perf_counter()
        self.explorer.configure(settings)
        self.explorer.preview()
        self.message = Text("")
        self.redraw()
        self.last_redraw_ms = (time.perf_counter() - start) * 1000
        self.say(f"{line.strip()} · table recomputed in {self.last_redraw_ms:.0f} ms (no forward pass)")
        self.screen.query_one("#status", Static).update(self.status_view())

    def save(self) -> None:
        """``s``: write the session file (its name asked, the last one offered)."""
        if self.running:
            self.pause()
            return
        self.push_screen(Ask("save the session to (Esc: cancel)", value=self.save_path), self._save_to)

    def _save_to(self, path: Optional[str]) -> None:
        if not path or not path.strip():
            return
        path = path.strip()
        try:
            session_file.write(self.explorer.session(), path)
        except ConfigError as exc:
            self.say(first_line(exc), "red")
        else:
            self.save_path = self.saved = path
            self.say(f"saved to {path}")
        self.redraw()

    def finish(self) -> None:
        """``q``: leave, giving the current branch's text (printed on stdout once the screen is gone)."""
        if self.running:
            self.pause()
            return
        self.exit(self.explorer.text(cut_at_stop=True))

    def action_interrupt(self) -> None:
        """Ctrl-C: leave at once, nothing printed, exit 130 (the terminal is restored as on ``q``)."""
        self.pause()
        self.exit(None, return_code=INTERRUPTED)


def flatten(renderable: Any, width: int) -> Text:
    """``renderable`` laid out once at ``width`` as styled text lines.

    Textual measures and renders a widget's content several times per frame; a rich Table does its column
    arithmetic each time (tens of milliseconds for the candidate table), styled lines almost nothing.
    """
    from rich.console import Console

    console = Console(width=max(width, 20), force_terminal=True, color_system="truecolor", legacy_windows=False)
    lines = console.render_lines(renderable, console.options, pad=False, new_lines=False)
    out = Text(no_wrap=True, overflow="crop", end="")
    for number, line in enumerate(lines):
        if number:
            out.append("\n")
        for segment in line:
            if not segment.control:
                out.append(segment.text, segment.style)
    return out


def edit_flags(line: str) -> list[str]:
    """What ``e`` was given (``KEY VALUE``, ``KEY=VALUE`` or ``preset NAME``) as the command-line flags it means."""
    from llmsample.session import flags_for

    text = line.strip()
    key, sep, value = text.partition("=")
    if not sep or " " in key.strip():
        key, _, value = text.partition(" ")
    key, value = key.strip(), value.strip()
    if not value:
        raise ConfigError(f"{text!r}: give a setting and its value, e.g. 'temperature 0.7' or 'preset creative'")
    if key in ("preset", "p"):
        return ["--preset", value]
    try:
        return flags_for(key, value)
    except ConfigError as exc:  # chat's words for the same mapping: say them as explore's key
        raise ConfigError(str(exc).replace("/set", "e", 1)) from None

"""``llmsample chat``: a multi-turn session over one loaded model, rendered through its chat template each turn.

On a terminal: a ``you>`` prompt, the answer streamed and coloured as ``generate`` colours it, and commands
(``/set KEY VALUE``, ``/preset NAME``, ``/candidates N``, ``/save FILE``, ``/clear``, ``/exit``). When stdin is not
a terminal: each line is one user turn (or a command) and each answer is one line on stdout, its backslashes and
newlines escaped (``\\\\``, ``\\n``, ``\\r``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Optional, TextIO

from rich.text import Text

from llmsample import chat, render, run
from llmsample.config import Settings
from llmsample.errors import ConfigError, ExitCode, first_line
from llmsample.sampling.registry import FIELDS

HELP = ("commands: /set KEY VALUE (a sampling setting, max_new_tokens, seed or stop), /preset NAME, /candidates N, "
        "/save FILE, /clear, /exit (or Ctrl-D)")
# Settings /set takes besides the sampling stages', with their flags.
GENERATION_FLAGS = {"max_new_tokens": "--max-new-tokens", "seed": "--seed", "stop": "--stop"}

# What the command line gives a session: its settings and candidate count for some flags added to its own.
Configure = Callable[[list[str]], tuple[Settings, int]]


def escape_line(text: str) -> str:
    r"""An answer as one line: ``\`` → ``\\``, newline → ``\n``, carriage return → ``\r``.

    >>> escape_line('a\\b\nc')
    'a\\\\b\\nc'
    """
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def flags_for(key: str, value: str) -> list[str]:
    """``/set KEY VALUE`` as the command-line flags it stands for (the command line then checks the value)."""
    name = key.replace("-", "_")
    if name in ("do_sample", "sample"):
        if value.lower() not in ("true", "false"):
            raise ConfigError(f"/set do_sample takes true or false, got {value!r}")
        return ["--sample" if value.lower() == "true" else "--greedy"]
    if name in GENERATION_FLAGS:
        return [GENERATION_FLAGS[name], value]
    field = FIELDS.get(name)
    if field is None or not field.cli:
        import difflib

        known = sorted([*(f.name for f in FIELDS.values() if f.cli), *GENERATION_FLAGS, "do_sample"])
        close = difflib.get_close_matches(name, known, n=1)
        raise ConfigError(f"/set: unknown setting {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return [field.flag, value]


class TurnRenderer(render.TextRenderer):
    """``generate``'s streamed, coloured text, its colour legend shown before the first answer only."""

    legend_shown = False

    def start(self, samples: int, streaming: bool) -> None:
        if self.legend_shown:
            self.streaming = streaming
            return
        super().start(samples, streaming)
        self.legend_shown = True


def is_terminal(stream: TextIO) -> bool:
    return stream.isatty()


@dataclasses.dataclass
class Session:
    base: run.GenerateOptions  # the model and run options; prompt, settings and candidates change per turn
    loaded: tuple[Any, float]  # the model, loaded once, and its load time
    configure: Configure
    out: Any  # rich Console for answers
    err: Any  # rich Console for everything else
    interactive: bool
    extra: list[str] = dataclasses.field(default_factory=list)  # flags added by /set, /preset, /candidates
    history: list[dict[str, str]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.settings, self.candidates = self.configure([])
        self.renderer = TurnRenderer(self.out, self.err) if self.interactive else render.Renderer(self.out, self.err)

    def error(self, message: str) -> None:
        self.err.file.write(f"llmsample: error: {message}\n")
        self.err.file.flush()

    def reconfigure(self, flags: list[str]) -> None:
        """Add flags to the session's command line; on a bad value, say so and keep the settings as they were."""
        self.settings, self.candidates = self.configure(self.extra + flags)
        self.extra += flags

    def command(self, line: str) -> bool:
        """Run one ``/command``; False ends the session."""
        name, _, rest = line[1:].strip().partition(" ")
        rest = rest.strip()
        if name in ("exit", "quit"):
            return False
        if name == "clear":
            self.history.clear()
            self.note("history cleared")
        elif name == "set" and len(rest.split(None, 1)) == 2:
            key, value = rest.split(None, 1)
            self.reconfigure(flags_for(key, value))
            self.note(f"{key} = {value}")
        elif name == "preset" and rest:
            self.reconfigure(["--preset", rest])
            self.note(f"preset {rest}")
        elif name == "candidates" and rest:
            self.reconfigure(["--candidates", rest])
        elif name == "save" and rest:
            self.save(rest)
            self.note(f"wrote {rest}")
        else:
            raise ConfigError(f"/{name}{' ' + rest if rest else ''}: not a command here; {HELP}")
        return True

    def note(self, message: str) -> None:
        if self.interactive:
            self.err.print(Text(message, style="dim"))

    def save(self, path: str) -> None:
        lm = self.loaded[0]
        data = {"schema": 1, "model": lm.name, "system": self.base.system, "messages": self.history,
                "settings": self.settings.sampling.to_dict()}
        try:
            with open(path, "w", encoding="utf-8") as file:
                file.write(json.dumps(data, ensure_ascii=False, indent=2) + "\n")
        except OSError as exc:
            raise ConfigError(f"/save: cannot write {path}: {exc.strerror or exc}") from None

    def turn(self, text: str) -> Optional[str]:
        """One user turn: the answer (streamed on a terminal), added to the history with the question."""
        opts = dataclasses.replace(self.base, prompt=text, settings=self.settings, candidates=self.candidates,
                                   history=tuple(self.history), chat=True)
        try:
            summary = run.generate(opts, self.renderer, loaded=self.loaded)
        except run.Interrupted as exc:
            if not self.interactive or exc.exit_code != ExitCode.INTERRUPTED:
                raise
            self.note("interrupted: this answer is left out of the history")
            return None
        answer = summary["text"]
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer

    def read(self, stdin: TextIO) -> Optional[str]:
        """The next input line (without its newline), or None at the end."""
        if self.interactive:
            try:
                return input("you> ")
            except EOFError:
                self.err.print()
                return None
        line = stdin.readline()
        return line.rstrip("\r\n") if line else None

    def loop(self, stdin: TextIO) -> None:
        if self.interactive:
            self.err.print(Text(f"chatting with {self.loaded[0].name}; {HELP}", style="dim"))
        while (line := self.read(stdin)) is not None:
            if not line.strip():
                continue
            try:
                if line.startswith("/"):
                    if not self.command(line):
                        return
                    continue
                answer = self.turn(line)
            except ConfigError as exc:  # a bad /set value, an unknown command, a template that fails: go on
                self.error(first_line(exc))
                continue
            if answer is not None and not self.interactive:
                self.out.file.write(escape_line(answer) + "\n")
                self.out.file.flush()


def check_template(lm: Any) -> None:
    """``chat`` needs a chat template: refuse a model without one (``generate`` continues plain text)."""
    if chat.template_of(lm.tokenizer) is None:
        raise ConfigError(f"{lm.name} has no chat template (tokenizer_config.json's chat_template), so it cannot "
                          "chat: use 'llmsample generate' for a plain continuation")


def start(base: run.GenerateOptions, configure: Configure, stdin: TextIO, out: Any, err: Any) -> None:
    """Load the model once (or connect to the serving engine once) and run the session until /exit or the end of
    input. A server renders its own chat template (its chat endpoint), so there is none to check here."""
    if base.server is not None:
        from llmsample.remote.server import connect

        loaded: tuple[Any, float] = (connect(base.server, base.model), 0.0)
    else:
        loaded = run.load_model(base.model, base.device, base.dtype, base.device_map, err, base.engine,
                                base.quantize)
        check_template(loaded[0])
    Session(base, loaded, configure, out, err, interactive=is_terminal(stdin)).loop(stdin)


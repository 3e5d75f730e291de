"""``llmsample explore``: check the terminal, load the model, run the full-screen program, print the chosen text."""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Mapping, Optional

from llmsample import run
from llmsample.config import Settings
from llmsample.errors import ConfigError, ExitCode
from llmsample.explore.stepper import DEFAULT_ROWS

INSTALL = "pip install 'llmsample[explore]'"


def check_settings(settings: Settings, output_format: str) -> None:
    """The generate options that explore cannot follow: one clear line each (exit 2)."""
    if settings.generation.num_samples != 1:
        raise ConfigError(f"explore follows one text at a time (b branches it), got --num-samples "
                          f"{settings.generation.num_samples}")
    if settings.sampling.num_beams > 1:
        raise ConfigError(f"explore takes one token at a time, which beam search cannot: got --num-beams "
                          f"{settings.sampling.num_beams}")
    if output_format not in ("text", "json"):
        raise ConfigError(f"explore --format takes text (q prints the text) or json (q prints the session), "
                          f"got {output_format!r}")


def locale_problem(env: Mapping[str, str], encoding: Optional[str]) -> Optional[str]:
    """Why the terminal cannot show explore's screen (not UTF-8), or None.

    The locale the user set decides (LC_ALL, else LC_CTYPE, else LANG; none set: the terminal's own, assumed
    UTF-8), and so does the encoding Python writes stderr in. Python turns a C locale into C.UTF-8 by setting
    LC_CTYPE itself (PEP 538): an LC_CTYPE of exactly C.UTF-8 beside another LANG is taken for that, not for the
    user's choice.

    >>> locale_problem({"LANG": "C"}, "utf-8")
    "explore needs a UTF-8 terminal, and LANG is 'C' (try LANG=C.UTF-8)"
    >>> locale_problem({"LANG": "C", "LC_CTYPE": "C.UTF-8"}, "utf-8") is not None
    True
    >>> locale_problem({"LANG": "en_US.UTF-8"}, "utf-8") is None, locale_problem({}, "utf-8") is None
    (True, True)
    """
    if encoding is not None and encoding.replace("-", "").replace("_", "").lower() != "utf8":
        return f"explore needs a UTF-8 terminal, and stderr is written as {encoding} (try LANG=C.UTF-8)"
    coerced = env.get("LC_CTYPE") == "C.UTF-8" and env.get("LANG") not in (None, "", "C.UTF-8")
    for name in ("LC_ALL", "LC_CTYPE", "LANG"):
        value = env.get(name, "")
        if not value or (name == "LC_CTYPE" and coerced and not env.get("LC_ALL")):
            continue
        if "utf-8" not in value.lower() and "utf8" not in value.lower():
            return f"explore needs a UTF-8 terminal, and {name} is {value!r} (try {name}=C.UTF-8)"
        return None
    return None


def check_terminal() -> None:
    """A UTF-8 terminal on stderr (Textual draws there) and keys to read: else one line, exit 2.

    A prompt piped on stdin is fine: the keys are then read from the terminal itself (/dev/tty).
    """
    problem = locale_problem(os.environ, getattr(sys.stderr, "encoding", None))
    if problem:
        raise ConfigError(problem)
    if not sys.stderr.isatty():
        raise ConfigError("explore draws its screen on stderr, which is not a terminal here: leave stderr on the "
                          "terminal (stdout may be redirected: it gets the text on q)")


def keys_from_terminal() -> None:
    """When stdin was a pipe (the prompt came that way), read the keys from the terminal instead."""
    if sys.stdin is not None and sys.stdin.isatty():
        return
    try:
        tty = os.open("/dev/tty", os.O_RDWR)
    except OSError:
        raise ConfigError("explore reads keys from a terminal: stdin is not one and /dev/tty cannot be opened") from None
    os.dup2(tty, 0)
    os.close(tty)


def need_textual() -> None:
    try:
        import textual  # noqa: F401
    except ImportError:
        raise ConfigError(f"explore needs Textual, which is not installed: {INSTALL}") from None


def build(opts: run.GenerateOptions, renderer: Any) -> Any:
    """Load the model, read the prompt into it, and return the ready ``Explorer``."""
    import random

    import torch

    from llmsample import chat, force
    from llmsample.explore.stepper import Explorer
    from llmsample.token_text import encoder, vocab_size

    lm, _ = run.load_model(opts.model, opts.device, opts.dtype, opts.device_map, renderer.err, opts.engine,
                           opts.quantize)
    prompt = chat.prepare(lm.tokenizer, lm.name, opts.prompt, opts.chat, opts.system)
    if prompt.mode == chat.RAW and opts.system is not None:
        renderer.warn("--system has no effect: the prompt is a plain continuation (raw), not a chat")
    ids = torch.tensor([prompt.ids], dtype=torch.long)
    if ids.shape[1] == 0:
        raise ConfigError("the prompt has no tokens")
    gen = opts.settings.generation
    ids, max_new = run.fit_context(ids, gen.max_new_tokens, lm.language_model.context_length, opts.truncate,
                                   renderer)
    settings = opts.settings
    if max_new != gen.max_new_tokens:
        import dataclasses

        settings = dataclasses.replace(settings, generation=dataclasses.replace(gen, max_new_tokens=max_new))
    seed = gen.seed if gen.seed is not None else random.SystemRandom().randrange(2**31)
    eos = run.eos_ids(lm, prompt.mode == chat.CHAT)
    forces = force.resolve(opts.force, encoder(lm.tokenizer), vocab_size(lm))
    for late in (f for f in forces if f.step > max_new):  # the context left less room than asked for
        renderer.warn(f"--force {late.spec!r} has no effect: generation stops after {max_new} tokens here")
    with run.cache_checked(lm):
        return Explorer(lm, ids[0].tolist(), settings, seed, eos, rows=opts.candidates or DEFAULT_ROWS,
                        prompt_text=prompt.text, given_prompt=opts.prompt, ignore_eos=opts.ignore_eos,
                        forces=force.by_index(forces))


def start(opts: run.GenerateOptions, configure: Optional[Callable[[list[str]], Settings]], renderer: Any,
          output_format: str = "text", separator: Optional[str] = None, no_color: bool = False) -> None:
    """Run ``explore``: on ``q`` the current branch's text (``--format json``: the session) goes to stdout."""
    import json
    import time

    check_settings(opts.settings, output_format)
    need_textual()
    check_terminal()
    explorer = build(opts, renderer)
    keys_from_terminal()
    if no_color:
        os.environ["NO_COLOR"] = "1"  # Textual reads it when the app starts
    from llmsample.explore.app import ExploreApp

    app = ExploreApp(explorer, configure)
    started = time.perf_counter()
    with run.cache_checked(explorer.lm):
        text = app.run()
    if app.return_code == ExitCode.INTERRUPTED:
        raise run.Interrupted("interrupted", ExitCode.INTERRUPTED)
    if app.return_code:
        raise ConfigError(f"the explore screen failed (exit {app.return_code}); run with --debug for more")
    if opts.stats:
        per = explorer.forward_s / max(explorer.forwards, 1) * 1000
        renderer.note(f"explore: {explorer.forwards} forward passes in {explorer.forward_s:.2f} s ({per:.0f} ms each)"
                      f" · {sum(len(b.steps) for b in explorer.branches)} steps in {len(explorer.branches)} "
                      f"branch(es) · {time.perf_counter() - started:.1f} s on screen")
    out = renderer.out.file
    if output_format == "json":
        out.write(json.dumps(explorer.session(), ensure_ascii=False) + "\n")
    else:
        text = text or ""
        out.write(text)
        out.write(separator if separator is not None else "" if text.endswith("\n") else "\n")
    out.flush()

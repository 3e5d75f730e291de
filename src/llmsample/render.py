"""Output: the answer to stdout, everything else (legend, warnings, stats, progress) to stderr.

rich decides about colour (TTY detection, ``NO_COLOR``, ``FORCE_COLOR``); ``--no-color`` forces it off.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional, TextIO

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from llmsample import events
from llmsample.sampling.registry import HEADERS

# Token colour by the probability it was sampled with: (lower bound, style, legend label). Likely tokens stay in
# the terminal's own colour; the less likely a token, the further it moves along a blue -> orange ramp. Blue and
# orange stay apart under red-green colour blindness (no red/green pair carries the meaning), each step differs in
# lightness too, and the mid-luminance 256-colour shades read on dark and light backgrounds alike. Orange, not
# red: an unlikely token is a surprise, not an error.
PROB_STYLES = [
    (0.9, "", "≥90%"),
    (0.5, "color(33)", "≥50%"),
    (0.2, "color(38)", "≥20%"),
    (0.05, "color(178)", "≥5%"),
    (0.0, "bold color(166)", "<5%"),
]


def style_for(prob: float) -> str:
    for bound, style, _ in PROB_STYLES:
        if prob >= bound:
            return style
    return PROB_STYLES[-1][1]


def make_consoles(no_color: bool = False, stdout: Optional[TextIO] = None,
                  stderr: Optional[TextIO] = None) -> tuple[Console, Console]:
    """``(out, err)`` consoles; neither wraps lines or highlights on its own."""
    kwargs: dict[str, Any] = dict(highlight=False, soft_wrap=True, emoji=False)
    if no_color:
        kwargs["no_color"] = True
        kwargs["color_system"] = None
    out = Console(file=stdout or sys.stdout, **kwargs)
    err = Console(file=stderr or sys.stderr, stderr=stderr is None, **kwargs)
    return out, err


def legend() -> Text:
    """One line: each probability band drawn in exactly the style its tokens get (only the caption is dim)."""
    line = Text()  # no base style: a Text's own style would apply to the swatches too (they were drawn dim)
    line.append("probability:", style="dim")
    for _, style, label in PROB_STYLES:
        line.append(" ")
        line.append(label, style=style or None)
    return line


class Renderer:
    """Receives the run as it happens. Subclasses decide what reaches stdout."""

    def __init__(self, out: Console, err: Console):
        self.out = out
        self.err = err

    def start(self, samples: int, streaming: bool) -> None: ...

    def token(self, sample: int, index: int, token_id: int, text: str, raw_prob: float, prob: float,
              temperature: float, candidates: Optional[dict] = None, stage_state: Optional[dict] = None) -> None: ...

    def tail(self, sample: int, text: str) -> None:
        """Text held back until the end (an incomplete character, a partial stop string that never completed)."""

    def beam_step(self, step: int, beams: list[dict[str, Any]]) -> None:
        """The candidates of every running beam before a beam-search step (``--candidates``)."""

    def sample_done(self, record: events.SampleRecord) -> None: ...

    def finish(self, summary: dict[str, Any]) -> None: ...

    def warn(self, message: str) -> None:
        self.err.print(Text("warning: ", style="yellow") + Text(message))

    def note(self, message: str) -> None:
        self.err.print(Text(message, style="dim"))


class PhaseBar:
    """A transient progress bar on stderr for a phase that runs past ``delay`` seconds (reading a long prompt,
    beam search): drawn only on a terminal, never on a pipe or a file, and gone when the phase ends.

    A timer shows it: the phase's first report may come only after a long first chunk of work.

    >>> import io
    >>> bar = PhaseBar(Console(file=io.StringIO()), "reading the prompt")
    >>> bar.update(5, 10); bar.update(10, 10); bar.shown
    False
    """

    def __init__(self, err: Console, label: str, delay: float = 1.0):
        import threading

        self.err, self.label, self.delay = err, label, delay
        self.shown = False
        self._lock = threading.Lock()
        self._done, self._total = 0, 0
        self._bar: Any = None
        self._task: Any = None
        self._timer: Any = None
        if err.is_terminal:
            self._timer = threading.Timer(delay, self._show)
            self._timer.daemon = True
            self._timer.start()

    def _show(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with self._lock:
            if self._timer is None:  # closed meanwhile
                return
            self._bar = Progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 console=self.err, transient=True)
            self._task = self._bar.add_task(self.label, total=self._total or None, completed=self._done)
            self._bar.start()
            self.shown = True

    def update(self, done: int, total: int) -> None:
        with self._lock:
            self._done, self._total = done, total
            if self._bar is not None:
                self._bar.update(self._task, completed=done, total=total)
        if done >= total:
            self.close()

    def close(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._bar is not None:
                self._bar.stop()
                self._bar = None


class TextRenderer(Renderer):
    """Plain text; on a colour terminal each token is coloured by its sampled probability.

    ``separator``: written after each sample as it is (``--separator``, ``-0``), instead of ending each sample with
    a newline and putting a blank line between samples, which a script cannot split when a sample holds one.
    """

    def __init__(self, out: Console, err: Console, separator: Optional[str] = None):
        super().__init__(out, err)
        self.separator = separator
        self.color = out.is_terminal and out.color_system is not None and not out.no_color
        self.streaming = True
        self.ended_with_newline = True

    def start(self, samples: int, streaming: bool) -> None:
        self.streaming = streaming
        if self.color and streaming:
            self.err.print(legend())

    def _write(self, text: str, style: Optional[str] = None) -> None:
        if not text:
            return
        if self.color and style:  # "" = the terminal's own colour (likely tokens)
            self.out.print(Text(text, style=style), end="")
        else:
            self.out.file.write(text)
        self.out.file.flush()
        self.ended_with_newline = text.endswith("\n")

    def token(self, sample, index, token_id, text, raw_prob, prob, temperature, candidates=None,
              stage_state=None) -> None:
        if self.streaming:
            self._write(text, style_for(prob) if prob is not None else None)
        if candidates is not None:
            if self.streaming and self.out.is_terminal and self.err.is_terminal:  # keep text and tables apart
                self.out.file.write("\n")
                self.out.file.flush()
                self.ended_with_newline = True
            title = f"step {index + 1}" + (f" · sample {sample + 1}" if not self.streaming else "")
            if stage_state and "grammar_cut" in stage_state:
                title += f" · grammar cut {_pct(stage_state['grammar_cut'])}% raw"
            how = "forced" if stage_state and stage_state.get("forced") else "chose"
            table = server_candidate_table if candidates.get("source") == "server" else candidate_table
            self.err.print(table(candidates, f"{title} · {how} {token_label(text or '', 24)}"))

    def beam_step(self, step: int, beams: list[dict[str, Any]]) -> None:
        for beam in beams:
            title = (f"step {step + 1} · beam {beam['beam'] + 1} · score {beam['score']:.3f}"
                     f" (normalised {beam['normalised']:.3f})")
            self.err.print(candidate_table(beam["candidates"], title))

    def tail(self, sample: int, text: str) -> None:
        if self.streaming:
            self._write(text)

    def sample_done(self, record: events.SampleRecord) -> None:
        if self.streaming:
            return
        if record.index > 0 and self.separator is None:
            self._write("\n")
        if self.err.is_terminal:
            label = f"── sample {record.index + 1}"
            if record.score is not None:
                label += f" (score {record.score:.4f})"
            self.err.print(Text(label + " ──", style="dim"))
        self._write(record.text)
        self._end_sample(record.text)

    def _end_sample(self, text: str) -> None:
        if self.separator is not None:
            self.out.file.write(self.separator)
            self.out.file.flush()
        elif not text.endswith("\n"):
            self._write("\n")

    def finish(self, summary: dict[str, Any]) -> None:
        if self.streaming:
            self._end_sample("\n" if self.ended_with_newline else "")


STAGE_HEADERS = HEADERS  # from the stage registry


def token_label(text: str, limit: int = 12) -> str:
    """A token made visible: quoted, whitespace and control characters escaped, long ones shortened."""
    shown = json.dumps(text, ensure_ascii=False)
    return shown if len(shown) <= limit else shown[: limit - 2] + "…\""


def _pct(p: float) -> str:
    return "0" if p == 0 else f"{100 * p:.1f}" if p >= 0.001 else "<.1"


def candidate_table(candidates: dict[str, Any], title: str, numbered: bool = False) -> Table:
    """One step's top candidates: raw probability, after each active stage, final, status, the chosen one.

    Probabilities in percent; columns only for the stages that ran, so it fits 80 columns. ``numbered``: the
    first column numbers rows 1-9 where nothing is chosen yet (explore takes a row by its number).
    """
    table = Table(title=title, title_justify="left", title_style="bold", show_edge=False, pad_edge=False,
                  box=None, header_style="dim", padding=(0, 1))
    table.add_column("#" if numbered else "", width=1)
    table.add_column("token", max_width=14, no_wrap=True)
    table.add_column("raw%", justify="right")
    shown_stages = candidates["stages"][:-1]  # the last stage's column would repeat the final one
    for stage in shown_stages:
        table.add_column(STAGE_HEADERS.get(stage, stage) + "%", justify="right")
    table.add_column("final%", justify="right")
    table.add_column("status", no_wrap=True)
    for number, row in enumerate(candidates["candidates"], 1):
        chosen = row.get("chosen", False)
        removed = row["removed_by"]
        status = Text(f"cut by {removed}", style="red") if removed else Text("kept", style="green")
        mark = "▶" if chosen else str(number) if numbered and number <= 9 else ""
        cells = [Text(mark, style="bold"), token_label(row["token"]), _pct(row["raw_prob"])]
        cells += [_pct(p) for p in row["stage_probs"][: len(shown_stages)]]
        cells += [Text(_pct(row["final_prob"]), style=style_for(row["final_prob"])), status]
        table.add_row(*cells, style="bold" if chosen else None)
    chain = " → ".join(STAGE_HEADERS.get(s, s) for s in candidates["stages"]) or "no stages"
    kept = "→".join(str(k) for k in candidates["kept"])
    table.caption = f"{chain}" + (f" (kept {kept})" if kept else "") + (
        f" · outside the table: {100 * candidates['raw_mass_outside']:.1f}% raw")
    table.caption_justify = "left"
    table.caption_style = "dim"
    return table


def server_candidate_table(candidates: dict[str, Any], title: str) -> Table:
    """A serving engine's top-N for one token: only what the server reported (raw log-probabilities, or
    llama-server's probabilities after its own sampler chain), never stage columns it does not give."""
    table = Table(title=title, title_justify="left", title_style="bold", show_edge=False, pad_edge=False,
                  box=None, header_style="dim", padding=(0, 1))
    post = candidates["kind"] == "post_sampling"
    table.add_column("", width=1)
    table.add_column("token", max_width=14, no_wrap=True)
    table.add_column("final%" if post else "raw%", justify="right")
    for row in candidates["candidates"]:
        chosen = row.get("chosen", False)
        prob = row["prob"] or 0.0
        table.add_row(Text("▶" if chosen else "", style="bold"), token_label(row["token"]),
                      Text(_pct(prob), style=style_for(prob) if post else None), style="bold" if chosen else None)
    what = ("after the server's sampler chain" if post else "raw top-N from the server, before its sampling")
    table.caption = f"{what} · shown {100 * candidates['mass_shown']:.1f}%"
    table.caption_justify = "left"
    table.caption_style = "dim"
    return table


class JsonRenderer(Renderer):
    """One JSON object for the whole run."""

    def finish(self, summary: dict[str, Any]) -> None:
        self.out.file.write(json.dumps(summary, ensure_ascii=False) + "\n")
        self.out.file.flush()


class JsonlRenderer(Renderer):
    """One JSON line per token as it is generated, then the summary line."""

    def _line(self, record: dict[str, Any]) -> None:
        self.out.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.out.file.flush()

    def token(self, sample, index, token_id, text, raw_prob, prob, temperature, candidates=None,
              stage_state=None) -> None:
        self._line(events.token_event(sample, index, token_id, text, raw_prob, prob, temperature, candidates,
                                      stage_state))

    def beam_step(self, step: int, beams: list[dict[str, Any]]) -> None:
        self._line({"type": "beam_step", "schema": events.SCHEMA_VERSION, "step": step, "beams": beams})

    def finish(self, summary: dict[str, Any]) -> None:
        self._line(summary)


RENDERERS = {"text": TextRenderer, "json": JsonRenderer, "jsonl": JsonlRenderer}


def make_renderer(fmt: str, out: Console, err: Console, separator: Optional[str] = None) -> Renderer:
    """The renderer for ``--format``; ``separator`` (text only) ends each sample."""
    return TextRenderer(out, err, separator) if fmt == "text" else RENDERERS[fmt](out, err)


def format_stats(stats: dict[str, Any]) -> str:
    parts = []
    if stats.get("load_s") is not None:
        parts.append(f"loaded {stats['load_s']:.2f} s after start")
    if stats.get("connect_s") is not None:
        parts.append(f"connected in {stats['connect_s']:.2f} s")
    if stats.get("prefill_tokens"):
        parts.append(f"prompt {stats['prefill_tokens']} tokens in {stats['prefill_s']:.2f} s "
                     f"({stats['prefill_tokens_per_s']:.0f} tok/s)")
    if stats.get("new_tokens"):
        parts.append(
            f"generated {stats['new_tokens']} tokens in {stats['decode_s']:.2f} s ({stats['tokens_per_s']:.1f} tok/s)"
        )
    if stats.get("finish_reason"):
        parts.append(f"finish: {stats['finish_reason']}")
    if stats.get("grammar_cut_mean") is not None:
        parts.append(f"grammar cut {_pct(stats['grammar_cut_mean'])}% raw mass per step "
                     f"(worst {_pct(stats['grammar_cut_max'])}%)")
    if stats.get("peak_rss_mib") is not None:
        parts.append(f"peak memory {stats['peak_rss_mib']:.0f} MiB")
    if stats.get("peak_cuda_mib") is not None:
        parts.append(f"peak CUDA memory {stats['peak_cuda_mib']:.0f} MiB")
    where = (f"{stats.get('device')}, {stats['quantize']} weights, {stats.get('dtype')} activations"  # int8 × float32
             if stats.get("quantize") else f"{stats.get('device')} {stats.get('dtype')}")
    if stats.get("engine"):
        how = ""
        if stats.get("quantize") and stats.get("decode_kernel"):
            how = ", compiled kernel" if stats["decode_kernel"] == "compiled" else \
                f", {stats['quantize']} via torch: {stats.get('decode_kernel_note') or 'no compiled kernel'}"
        where += f" ({stats['engine']} engine{how})"
    parts.append(where)
    return " · ".join(parts)


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False) if value else "—"
    if isinstance(value, list) and value and isinstance(value[0], tuple):
        return ", ".join(f"{a}→{b:g}" for a, b in value)  # schedule: from token → temperature
    if isinstance(value, (list, tuple)):
        if not value:
            return "—"
        if all(isinstance(v, str) and v.isidentifier() for v in value):
            return ",".join(value)  # stage names
        return ", ".join(json.dumps(v, ensure_ascii=False) for v in value)
    if value is None:
        return "—"
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else str(value)


def settings_table(settings: Any, title: Optional[str] = None) -> Table:
    """The resolved settings, where each came from, and which have no effect."""
    inactive = dict(settings.inactive())
    table = Table(title=title, show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("setting")
    table.add_column("value", overflow="fold")
    table.add_column("from", overflow="fold")
    for key, value, source in settings.rows():
        note = inactive.get(key)
        style = "dim" if source == "default" and note is None else None
        value_text = Text(_shown(value), style="strike dim" if note else style)
        from_text = Text(source, style=style)
        if note:
            from_text += Text(f"  inactive: {note}", style="yellow")
        table.add_row(Text(key.removeprefix("sampling."), style=style), value_text, from_text)
    return table


def settings_dict(settings: Any) -> dict[str, Any]:
    """JSON-ready: every setting with its value, source and (when it has no effect) why."""
    inactive = dict(settings.inactive())
    out = {key: {"value": value, "from": source, **({"inactive": inactive[key]} if key in inactive else {})}
           for key, value, source in settings.rows()}
    return {"settings": out, "chain": settings.sampling.describe_chain()}


BAR_WIDTH = 12


def _bar(prob: float, width: int = BAR_WIDTH) -> str:
    eighths = round(prob * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + ("▏▎▍▌▋▊▉"[part - 1] if part else "")).ljust(width)


def inspect_view(result: dict[str, Any]) -> list[Any]:
    """Seed 002's figure in the terminal: per step, the top probabilities of each setting as bars, side by side."""
    from rich.columns import Columns
    from rich.panel import Panel

    out: list[Any] = []
    for step in result["steps"]:
        context = json.dumps(step["context"], ensure_ascii=False) if step["context"] else "the prompt"
        out.append(Text(f"step {step['index'] + 1}: next token after {context}", style="bold"))
        panels = []
        for variant in step["variants"]:
            body = Text()
            for item in variant["top"]:
                label = token_label(item["token"], 10)
                body.append(label + " " * max(1, 11 - cell_len(label)))  # CJK characters are two cells wide
                body.append(_bar(item["prob"]), style=style_for(item["prob"]))
                body.append(f" {_pct(item['prob']):>5}%\n")
            if variant["entropy"] is None:  # a serving engine: its top-N, not the whole distribution
                body.append("the server's top-N only", style="dim")
            else:
                body.append(f"entropy {variant['entropy']:.2f} nats · kept {variant['kept']}", style="dim")
            if variant["order_sensitive"]:
                o = variant["order_sensitive"]
                body.append(f"\n⚑ order matters: T last keeps {o['temperature_last']}, T first "
                            f"{o['temperature_first']}", style="yellow")
            panels.append(Panel(body, title=variant["label"], title_align="left", width=36, padding=(0, 1)))
        out.append(Columns(panels))
        if step["differences"]:
            lines = [f"{token_label(d['token'], 12)} kept by {', '.join(d['kept_by']) or 'none'}"
                     for d in step["differences"]]
            extra = step["differing_count"] - len(step["differences"])
            out.append(Text("kept sets differ: " + "; ".join(lines) + (f"; and {extra} more" if extra > 0 else ""),
                            style="dim"))
        elif len(step["variants"]) > 1:
            out.append(Text("all settings keep the same candidates", style="dim"))
    return out


SWEEP_COLUMNS = [("distinct_1", "dist-1", "{:.3f}"), ("distinct_2", "dist-2", "{:.3f}"),
                 ("repeated_3gram_rate", "rep-3", "{:.3f}"), ("mean_entropy", "H", "{:.2f}"),
                 ("perplexity", "ppl", "{:.1f}"), ("mean_length", "len", "{:.1f}")]


def sweep_table(rows: list[dict[str, Any]], grid: dict[str, list]) -> Table:
    table = Table(show_edge=False, pad_edge=False, header_style="bold", caption_justify="left", caption_style="dim")
    for name in grid:
        table.add_column(name, justify="right", no_wrap=True, min_width=len(name))
    for _, header, _ in SWEEP_COLUMNS:
        table.add_column(header, justify="right", no_wrap=True, min_width=max(5, len(header)))
    # A wrappable column holding one-line text: rich shrinks it to fit and cuts the text with an ellipsis. A
    # no_wrap column would instead claim the whole sample's width and squeeze the other columns to nothing.
    table.add_column(Text("first sample", no_wrap=True, overflow="ellipsis"), ratio=1, min_width=8)
    for row in rows:
        sample = Text(json.dumps(row["sample"], ensure_ascii=False), no_wrap=True, overflow="ellipsis")
        table.add_row(*[str(row["point"][n]) for n in grid],
                      *["—" if row[key] is None else fmt.format(row[key]) for key, _, fmt in SWEEP_COLUMNS], sample)
    table.caption = ("dist-n: distinct n-grams / all n-grams over the samples · rep-3: repeated 3-gram rate · "
                     "H: mean entropy of the final distributions (nats) · ppl: perplexity of the chosen tokens "
                     "under the model · len: mean tokens")
    return table


def sweep_csv(rows: list[dict[str, Any]], grid: dict[str, list]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    keys = [key for key, _, _ in SWEEP_COLUMNS] + ["mean_logprob"]
    writer.writerow([*grid, *keys, "chain", "sample"])
    for row in rows:
        writer.writerow([*(row["point"][n] for n in grid), *("" if row[k] is None else f"{row[k]:.6g}" for k in keys),
                         row["chain"],
                         row["sample"]])
    return buffer.getvalue()


def _where(env: dict[str, Any]) -> str:
    """A run's model and machine on one line: ``M · cpu · float32 · llmsample engine · int8``."""
    parts = [str(env.get("model")), str(env.get("device")), str(env.get("dtype"))]
    if env.get("engine"):
        parts.append(f"{env['engine']} engine")
    if env.get("quantize"):
        parts.append(str(env["quantize"]))
    return " · ".join(parts)


def _taken_label(side: dict[str, Any]) -> str:
    if "token_id" not in side:
        return f"the end ({side.get('finish_reason')})"
    probs = []
    for key, name in (("raw_prob", "raw"), ("prob", "final")):
        if side.get(key) is not None:
            probs.append(f"{name} {_pct(side[key])}%")
    how = " forced" if side.get("forced") or side.get("how") == "forced" else ""
    return (f"{token_label(side.get('token', ''), 24)} (id {side['token_id']}{how}"
            + (f"; {', '.join(probs)}" if probs else "") + ")")


def replay_view(report: dict[str, Any]) -> list[Any]:
    """``replay``'s report: what was compared, then identical, or the first step that differs with the recorded
    and the new candidate table at that step."""
    out: list[Any] = [
        Text(f"replay {report['file']} ({report['kind']}: {report['description']})", style="bold"),
        Text(f"recorded  {_where(report['recorded'])}"),
        Text(f"now       {_where(report['now'])}"),
    ]
    if report.get("overrides"):
        out.append(Text(f"changed   {', '.join(report['overrides'])}"))
    tolerance = f"tolerance {report['tolerance']:g}"
    d = report["divergence"]
    if d is None:
        out.append(Text(f"identical: {report['steps_compared']} steps compared, largest probability difference "
                        f"{report['max_difference']:.3g} ({tolerance})", style="green"))
        return out
    sample = f"sample {d['sample'] + 1}" if report["kind"] == "generate output" else f"branch {d['sample']}"
    out.append(Text(f"differs at step {d['step']} ({sample}): {d['detail']} ({tolerance})", style="yellow"))
    out.append(Text(f"  recorded  {_taken_label(d['recorded'])}"))
    out.append(Text(f"  now       {_taken_label(d['now'])}"))
    out.append(Text(f"  text before it: {json.dumps(d['text_before'], ensure_ascii=False)}", style="dim"))
    for side, name in ((d["recorded"], "recorded"), (d["now"], "now")):
        table = side.get("candidates")
        if table:
            out.append(candidate_table(table, f"{name} · step {d['step']}"))
        elif name == "recorded":
            out.append(Text("(the file has no candidate table at this step: record with --candidates N)",
                            style="dim"))
    return out

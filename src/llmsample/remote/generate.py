"""``generate --engine openai``: the resolved settings sent to a serving engine, its answer streamed through the
same renderers as a local run."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from llmsample import events
from llmsample.errors import ConfigError, ExitCode, ServerError
from llmsample.remote import dialects, stream
from llmsample.remote.http import StreamCut, server_message
from llmsample.remote.server import Server, connect, describe
from llmsample.render import JsonlRenderer, JsonRenderer, Renderer, TextRenderer, format_stats


@dataclass
class Prepared:
    """One run's requests, ready to send."""

    server: Server
    endpoint: str
    request: dialects.Request
    prompt_fields: dict  # {"prompt": …} or {"messages": […]}
    chat: bool


def messages(prompt: str, system: Optional[str], history: tuple = ()) -> list[dict]:
    """The chat endpoint's messages: the system message, earlier turns, then the prompt as the user's turn."""
    out = [{"role": "system", "content": system}] if system is not None else []
    return out + [dict(turn) for turn in history] + [{"role": "user", "content": prompt}]


def prepare(opts: Any, renderer: Renderer, server: Optional[Server] = None) -> Prepared:
    """Connect (unless ``server``), build the body, and warn about every setting the server cannot honour."""
    settings = opts.settings
    server = server or connect(opts.server, opts.model)
    dialect = server.dialect
    chat = bool(opts.chat)
    # Probabilities cost the server time (llama-cpp-python sorts the whole vocabulary per token): asked for only
    # where something shows them: colours, JSON, candidate tables.
    wanted = (isinstance(renderer, (JsonRenderer, JsonlRenderer)) or isinstance(renderer, TextRenderer)
              and renderer.color or getattr(renderer, "wants_probs", False))
    req = dialects.request(dialect, settings, settings.generation.num_samples, opts.ignore_eos, opts.candidates,
                           wanted, getattr(renderer, "post_sampling", True))
    values = {key: value for key, value, _ in settings.rows()} | {"ignore_eos": opts.ignore_eos}
    for key, why in settings.warnings():  # as a local run: the user's own choices that have no effect
        renderer.warn(f"{key.split('.')[-1]}={values[key]} has no effect: {why}")
    own = settings.own_sources
    for key, why in req.unsupported:
        if key in ("ignore_eos", "schedule") or settings.sources.get(key) in own or key == "sampling.order" and any(
                settings.sources.get(f"sampling.{name}") in own for name in dialects.in_use(settings)):
            shown = values[key] if key != "sampling.order" else ",".join(req.order["stages"])
            renderer.warn(f"{key.split('.')[-1]}={shown} has no effect: {why}")
    if opts.candidates and not dialect.logprobs:
        renderer.warn(f"--candidates {opts.candidates} has no effect: {dialect.title} reports no probabilities")
    elif opts.candidates > dialect.max_logprobs:
        renderer.warn(f"--candidates {opts.candidates}: {dialect.title} lists at most {dialect.max_logprobs} "
                      "alternatives per token")
    if chat and dialect.stream_format == "llama-server":
        req.body.pop("n_probs", None), req.body.pop("post_sampling_probs", None)
        req.body["logprobs"], req.body["top_logprobs"] = True, min(max(opts.candidates, 1), 20)
    elif chat and "logprobs" in req.body:  # the chat endpoint asks for them in two fields
        top = req.body.pop("logprobs")
        req.body["logprobs"], req.body["top_logprobs"] = True, top
    if chat and "n_predict" in req.body:
        req.body["max_tokens"] = req.body.pop("n_predict")
    fields = {"messages": messages(opts.prompt, opts.system, opts.history)} if chat else {"prompt": opts.prompt}
    if not chat and opts.system is not None:
        renderer.warn("--system has no effect: the prompt is a plain continuation (raw), not a chat (--chat)")
    if opts.explain:
        explain(server, req, chat, renderer)
    return Prepared(server, dialect.chat if chat else dialect.completions, req, fields, chat)


def explain(server: Server, req: dialects.Request, chat: bool, renderer: Renderer) -> None:
    """What goes to the server (stderr): dialect, endpoint, the body's settings, the order, what it cannot take."""
    d = server.dialect
    renderer.note(f"server: {server.client.url} · {d.title} (dialect {d.name}, "
                  f"{'detected' if server.detected else 'from --dialect'}) · model {server.model} · "
                  f"{d.chat if chat else d.completions} ({'chat: the server applies its template' if chat else 'raw'})")
    sent = {key: value for key, value in req.body.items()}
    renderer.note("sent: " + ", ".join(f"{key}={_short(value)}" for key, value in sent.items()))
    order = req.order
    if order["how"] == "samplers":
        renderer.note(f"order: honoured (samplers {','.join(order['server_order'])})")
    elif order["how"] == "fixed":
        renderer.note(f"order: not taken; {d.title}'s fixed order is {' -> '.join(order['server_order'])}"
                      + (f" ({order['why']})" if order.get("differs") else ""))
    else:
        renderer.note(f"order: not taken; {d.title} applies its own")
    for key, why in req.unsupported:
        renderer.note(f"not honoured: {key.split('.')[-1]}: {why}")
    for caveat in req.caveats:
        renderer.note(f"note: {caveat}")
    probs = {"openai": "raw top-N from the server (log-probabilities before sampling)",
             "llama-server": "after the server's sampler chain (post_sampling_probs)", "": "none reported"}
    renderer.note(f"probabilities: {probs[d.logprobs]}")


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "…"


def _requests(prep: Prepared, samples: int, seed: int, model: str) -> Iterator[tuple[int, dict]]:
    """(first sample, body) per request: one with ``n`` where the server takes it, else one per sample, sample i
    with seed + i (the same seed would draw the same text every time)."""
    base = {"model": model, **prep.prompt_fields, **prep.request.body, "stream": True}
    if prep.server.dialect.takes_n or samples == 1:
        yield 0, base | {"seed": seed}
        return
    for i in range(samples):
        yield i, base | {"seed": (seed + i) % 2**63}


def generate(opts: Any, renderer: Renderer, server: Optional[Server] = None) -> dict[str, Any]:
    """Send the run to the server, stream its tokens to ``renderer``; returns the summary record (as
    ``run.generate``). A cut stream keeps what came, completes the JSON with finish reason ``error`` and raises."""
    from llmsample.run import Interrupted, _sigterm_raises, _Terminated

    settings = opts.settings
    gen = settings.generation
    if settings.sampling.num_beams > 1 and gen.num_samples > settings.sampling.num_beams:
        raise ConfigError(f"--num-samples must be <= --num-beams ({settings.sampling.num_beams}) with beam search, "
                          f"got {gen.num_samples}")
    start = time.perf_counter()
    prep = prepare(opts, renderer, server)
    connect_s = time.perf_counter() - start
    seed = gen.seed if gen.seed is not None else random.SystemRandom().randrange(2**31)
    samples = gen.num_samples
    records = [events.SampleRecord(i) for i in range(samples)]
    stats: dict[str, Any] = {"load_s": None, "connect_s": connect_s, "device": "server", "dtype": None,
                             "first_token_s": None, "engine": "openai"}
    renderer.start(samples, streaming=samples == 1)
    temperature = 0.0 if settings.sampling.greedy else settings.sampling.temperature
    failure: Optional[ServerError] = None
    interrupted: Optional[tuple[str, ExitCode]] = None
    decode_start = time.perf_counter()
    try:
        with _sigterm_raises():  # SIGTERM, like Ctrl-C, keeps what came and completes the JSON
            _stream_all(prep, records, samples, seed, gen, stats, decode_start, temperature, opts.candidates,
                        renderer)
    except StreamCut as exc:
        failure = exc
    except ServerError as exc:
        if not any(r.token_ids for r in records):
            raise  # nothing came: one line, no half-made summary
        failure = exc
    except KeyboardInterrupt:
        interrupted = ("interrupted", ExitCode.INTERRUPTED)
    except _Terminated:
        interrupted = ("terminated", ExitCode.TERMINATED)
    elapsed = time.perf_counter() - decode_start
    for record in records:
        if failure is not None or interrupted:
            record.finish_reason = record.finish_reason or ("error" if failure else interrupted[0])
        record.finish_reason = record.finish_reason or "length"
        renderer.sample_done(record)
    new_tokens = sum(len(r.token_ids) for r in records)
    first = stats["first_token_s"] or 0.0
    decode_s = max(elapsed - first, 0.0)
    stats.update(prefill_s=first, decode_s=decode_s, new_tokens=new_tokens,
                 tokens_per_s=(new_tokens - len(records)) / decode_s if decode_s > 0 and new_tokens > 1 else 0.0,
                 finish_reason=records[0].finish_reason)
    server_info = describe(prep.server) | {
        "endpoint": prep.endpoint, "sent": prep.request.body,
        "not_honoured": {key: why for key, why in prep.request.unsupported}, "order": prep.request.order,
        "probabilities": {"openai": "raw top-N from the server", "llama-server": "post-sampling",
                          "": "none"}[prep.server.dialect.logprobs],
        "notes": prep.request.caveats}
    summary_settings = settings.sampling.to_dict() | {
        "max_new_tokens": gen.max_new_tokens, "stop": list(gen.stop), "num_samples": samples,
        "chain": settings.sampling.describe_chain(),
        "schedule": [[e.from_token, e.temperature] for e in settings.schedule]}
    summary = events.summary(opts.prompt, records, summary_settings, {
        "seed": seed, "model": prep.server.model, "device": "server", "dtype": None, "engine": "openai",
        "server": server_info, "finish_reason": records[0].finish_reason, "stats": stats,
        "prompt_format": "chat" if prep.chat else "raw"})
    renderer.finish(summary)
    if opts.stats:
        renderer.note(format_stats(stats | {"device": prep.server.client.url, "dtype": prep.server.dialect.name,
                                            "prefill_tokens": 0}))
    if failure is not None:
        raise failure
    if interrupted:
        raise Interrupted(*interrupted)
    return summary


def _stream_all(prep: Prepared, records: list, samples: int, seed: int, gen: Any, stats: dict, decode_start: float,
                temperature: float, top_n: int, renderer: Renderer) -> None:
    """Every request of the run, its tokens into the records and onto the renderer."""
    for first, body in _requests(prep, samples, seed, prep.server.model):
        for event in _events(prep, body, first, bool(gen.stop)):
            if isinstance(event, stream.ServerFinish):
                if event.sample < samples and records[event.sample].finish_reason is None:
                    records[event.sample].finish_reason = event.reason
                continue
            if event.sample >= samples:
                continue
            if stats["first_token_s"] is None:
                stats["first_token_s"] = time.perf_counter() - decode_start
            _record(records[event.sample], event, temperature, top_n, renderer)
        asked = records[first:first + body.get("n", 1)]
        if any(record.finish_reason is None for record in asked):  # no [DONE], no finish reason: cut
            raise StreamCut(f"the stream from {prep.server.client.url} ended before the answer did")


def _events(prep: Prepared, body: dict, first: int, stops_given: bool) -> Iterator[stream.Event]:
    """The events of one streamed request."""
    client, dialect = prep.server.client, prep.server.dialect
    native = dialect.stream_format == "llama-server" and not prep.chat
    for chunk in client.stream(prep.endpoint, body):
        if isinstance(chunk, dict) and "error" in chunk and not chunk.get("choices"):  # an error event mid-stream
            raise StreamCut(f"the server at {client.url} reported an error mid-answer: "
                            f"{server_message(json.dumps(chunk).encode())}")
        if native:
            yield from stream.llama_server_events(chunk, first)
        else:
            yield from stream.openai_events(chunk, first, stops_given)


def _record(record: events.SampleRecord, token: stream.ServerToken, temperature: float, top_n: int,
            renderer: Renderer) -> None:
    """One token into its sample's record and onto the renderer (probabilities as the server gave them)."""
    record.token_ids.append(token.token_id)
    record.raw_probs.append(token.raw_prob)
    record.probs.append(token.prob)
    record.temperatures.append(temperature)
    record.text += token.text
    table = candidates(token, top_n) if top_n else None
    if table is not None:
        record.candidates.append(table)
    shown = token.prob if token.prob is not None else token.raw_prob
    renderer.token(record.index, len(record.token_ids) - 1, token.token_id, token.text, token.raw_prob, shown,
                   temperature, table, None)


def candidates(token: stream.ServerToken, top_n: int) -> Optional[dict]:
    """The server's top-N for one token, in a shape of its own: no stage columns, no "cut by", as the server
    says neither; ``kind`` says whether the probabilities are raw or after the server's sampler chain."""
    if not token.top:
        return None
    rows = [dict(row, chosen=(row["token_id"] == token.token_id if token.token_id is not None
                              else row["token"] == token.token)) for row in token.top[:top_n]]
    shown = sum(row["prob"] or 0.0 for row in rows)
    return {"source": "server", "kind": token.top_kind, "candidates": rows, "mass_shown": round(shown, 6)}

"""One function per command, gluing config → model → decode loop → renderer."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from llmsample import events, process
from llmsample.config import Settings, temperature_at
from llmsample.errors import (
    OUT_OF_MEMORY_ADVICE,
    ConfigError,
    ExitCode,
    LlmsampleError,
    ModelError,
    OutOfMemory,
    SamplingError,
    is_out_of_memory,
)
from llmsample.render import Renderer, format_stats


class Interrupted(LlmsampleError):
    """Ctrl-C or SIGTERM ended the run after its output was completed."""

    def __init__(self, reason: str, exit_code: ExitCode):
        super().__init__(reason)
        self.exit_code = exit_code


class _Terminated(BaseException):
    """Raised from the SIGTERM handler, while loading and decoding. Like KeyboardInterrupt, no ``except Exception``
    on its way swallows it, and every ``finally`` on its way (the model cache's clean-up) runs."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into ``_Terminated`` for the block."""

    def on_term(signum: int, frame: Any) -> None:
        process.deliver(_Terminated)

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: SIGTERM keeps its default
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@dataclass
class GenerateOptions:
    prompt: str
    settings: Settings
    model: Optional[str] = None
    device: str = "auto"
    dtype: str = "auto"
    device_map: Optional[str] = None
    stats: bool = False
    ignore_eos: bool = False
    truncate: bool = False
    candidates: int = 0  # top-n candidate tables per step (0 = none)
    engine: str = "auto"
    quantize: Optional[str] = None
    chat: Optional[bool] = None  # --chat (True), --raw (False), or chosen by the model's template (None)
    system: Optional[str] = None  # --system: the chat's system message
    history: tuple = ()  # earlier turns ({"role", "content"}) of a chat session
    explain: bool = False  # say which prompt format ran (stderr)
    server: Optional[Any] = None  # --engine openai: a remote.server.ServerOptions (the model is the server's)
    force: tuple = ()  # --force: llmsample.force.Force specs, checked against the settings (force.parse)


# ---- input -----------------------------------------------------------------------------------------------------


def decode_utf8(data: bytes, source: str) -> str:
    """Strict UTF-8 with an error that names the byte offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source} is not valid UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start}") from None


def read_prompt(argument: Optional[str], file: Optional[str], stdin: Any = None) -> str:
    """The prompt from the argument, ``-f FILE``, or stdin when it is not a terminal (stdin first, as ``llm``)."""
    parts: list[str] = []
    stdin = sys.stdin if stdin is None else stdin
    if file is not None:
        try:
            data = Path(file).read_bytes() if file != "-" else stdin.buffer.read()
        except OSError as exc:
            raise ConfigError(f"cannot read prompt file {file}: {exc.strerror or exc}") from None
        parts.append(decode_utf8(data, f"prompt file {file}"))
    elif stdin is not None and not stdin.isatty():
        data = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode()
        if data:
            parts.append(decode_utf8(data, "stdin"))
    if argument is not None:
        parts.append(argument)
    prompt = "\n".join(part for part in parts if part)
    if not prompt.strip():
        raise ConfigError("the prompt is empty: give it as an argument, with -f FILE, or on stdin")
    return prompt


# ---- device ----------------------------------------------------------------------------------------------------


def resolve_device(device: str, dtype: str) -> tuple[str, str]:
    """``auto|cpu|cuda|cuda:N`` and ``auto|float32|bfloat16|float16`` → concrete names, or a clear error."""
    import torch

    name = device.strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        pass
    elif name == "cuda" or name.startswith("cuda:"):
        index = name.partition(":")[2]
        if index and not index.isdigit():
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
        if not torch.cuda.is_available():
            raise ModelError(f"--device {device}: no CUDA device is available (use --device cpu)")
        if index and int(index) >= torch.cuda.device_count():
            raise ModelError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) (cuda:0…)")
    else:
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if dtype == "auto":
        if name.startswith("cuda"):
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    elif dtype == "bfloat16" and name.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise ModelError(f"--dtype bfloat16: {torch.cuda.get_device_name(name)} cannot run it (use float16)")
    return name, dtype


def candidates_dict(trace: Any, row: int, tokenizer: Any, chosen: Optional[int]) -> dict[str, Any]:
    """One row of a ``StepTrace`` as JSON-ready data with the token texts and the chosen one marked."""
    data = trace.to_dict(row)
    for candidate in data["candidates"]:
        candidate["token"] = tokenizer.decode([candidate["token_id"]])
        candidate["chosen"] = candidate["token_id"] == chosen
    return data


def fit_context(prompt_ids: Any, max_new_tokens: int, context: Optional[int], truncate: bool,
                renderer: Renderer) -> tuple[Any, int]:
    """Refuse (or, with ``--truncate``, left-truncate) a prompt longer than the context; cap the new tokens."""
    if context is None:
        return prompt_ids, max_new_tokens
    length = prompt_ids.shape[1]
    if length >= context:
        if not truncate:
            raise ConfigError(f"the prompt has {length} tokens, the model's context is {context}: shorten it, or "
                              "pass --truncate to drop its start")
        keep = max(1, context - min(max_new_tokens, context // 2))  # leave room to generate
        renderer.warn(f"the prompt has {length} tokens, the model's context is {context}: "
                      f"kept its last {keep} tokens (--truncate)")
        prompt_ids = prompt_ids[:, length - keep:]
        length = keep
    if length + max_new_tokens > context:
        renderer.warn(f"only {context - length} new tokens fit in the model's context of {context}: "
                      f"generation stops there")
        max_new_tokens = context - length
    return prompt_ids, max_new_tokens


def eos_ids(lm: Any, chat: bool = False) -> list[int]:
    """EOS ids from the generation config and the tokenizer (Gemma ends turns with a second one); in chat mode
    also the end-of-turn tokens a template writes (``chat.END_OF_TURN``), where the vocabulary has them."""
    from llmsample.chat import end_of_turn_ids

    ids = set(lm.language_model.eos_token_ids)
    if isinstance(lm.tokenizer.eos_token_id, int):
        ids.add(lm.tokenizer.eos_token_id)
    return sorted(ids | (end_of_turn_ids(lm.tokenizer) if chat else set()))


# ---- generate --------------------------------------------------------------------------------------------------

LOADING = "loading the model…"


def load_model(model: Optional[str], device: str, dtype: str, device_map: Optional[str], err: Any,
               engine: str = "auto", quantize: Optional[str] = None) -> tuple[Any, float]:
    """Resolve the device, load with a status line on stderr; returns the model and the seconds from the process's
    start until it was ready (imports included: what a person waits for)."""
    try:
        with _sigterm_raises(), err.status(LOADING, spinner="dots") as status:
            from llmsample import models  # imports torch: about a second, under the spinner

            given_dtype = dtype
            device, dtype = resolve_device(device, dtype)
            if quantize == "auto":
                quantize = models.auto_quantize(model, device, given_dtype, device_map, engine)
            lm = models.load(model, device=device, dtype=dtype, device_map=device_map,
                             report=lambda message: status.update(message), engine=engine, quantize=quantize)
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise out_of_memory(device) from None
    except _Terminated:  # a first-use conversion has removed its temporary folder on the way out
        raise Interrupted("terminated", ExitCode.TERMINATED) from None
    if process.was_interrupted():  # Ctrl-C during an import that swallowed the KeyboardInterrupt: honour it now
        raise Interrupted("interrupted", ExitCode.INTERRUPTED)
    return lm, process.seconds_since_start()


@dataclass
class _Decoding:
    """What one run's decode loop fills in, shared by the sampling and beam paths."""

    lm: Any
    prompt_ids: Any
    sampler: Any
    max_new_tokens: int
    stop_ids: list[int]
    stops_text: list[str]
    records: list[events.SampleRecord]
    renderer: Renderer
    candidates: int
    stats: dict[str, Any]
    stops: list[Any]  # one StopMatcher per sample
    detoks: list[Any]  # one IncrementalDetokenizer per sample
    forces: tuple = ()  # --force: llmsample.force.Force, each with its token id

    @property
    def rows(self) -> int:
        """Rows the model runs at once: the beams in beam search, else the samples."""
        beams = self.sampler.config.num_beams
        return beams if beams > 1 else len(self.records)


def generate(opts: GenerateOptions, renderer: Renderer, loaded: Optional[tuple[Any, float]] = None) -> dict[str, Any]:
    """Load the model (unless ``loaded``: a model and its load time, as a chat session keeps it), decode, render.
    Returns the summary record. With ``opts.server`` the run goes to a serving engine (``llmsample.remote``)."""
    if opts.server is not None:
        if opts.force:
            raise ConfigError("--force needs a local model: a serving engine draws its tokens itself")
        from llmsample.remote.generate import generate as generate_remote

        return generate_remote(opts, renderer, loaded[0] if loaded else None)
    # Importing torch takes about a second: the spinner load_model shows starts here, not after it.
    with contextlib.nullcontext() if loaded else renderer.err.status(LOADING, spinner="dots"):
        from llmsample import chat, force, grammar, models
        from llmsample.decode import DecodeState
        from llmsample.detok import IncrementalDetokenizer, StopMatcher
        from llmsample.sampling import Sampler
        from llmsample.token_text import control_token_ids, encoder, for_model, vocab_size

    cfg, gen = opts.settings.sampling, opts.settings.generation
    values = {key: value for key, value, _ in opts.settings.rows()}
    for key, why in opts.settings.warnings():  # the user's own choices; the others show in --explain
        renderer.warn(f"{key.split('.')[-1]}={values[key]} has no effect: {why}")
    if cfg.num_beams > 1 and gen.num_samples > cfg.num_beams:
        raise ConfigError(f"--num-samples must be <= --num-beams ({cfg.num_beams}) with beam search, "
                          f"got {gen.num_samples}")
    seed = gen.seed if gen.seed is not None else random.SystemRandom().randrange(2**31)
    lm, load_s = loaded or load_model(opts.model, opts.device, opts.dtype, opts.device_map, renderer.err,
                                      opts.engine, opts.quantize)
    device, dtype = str(lm.device), lm.dtype
    prompt = chat.prepare(lm.tokenizer, lm.name, opts.prompt, opts.chat, opts.system, opts.history)
    if opts.explain:
        renderer.note(f"prompt format: {prompt.mode}" + (" (the model's chat template)" if prompt.mode == chat.CHAT
                                                          else " (plain continuation)"))
    if prompt.mode == chat.RAW and opts.system is not None:
        renderer.warn("--system has no effect: the prompt is a plain continuation (raw), not a chat")
    import torch

    prompt_ids = torch.tensor([prompt.ids], dtype=torch.long, device=lm.device)
    if prompt_ids.shape[1] == 0:
        raise ConfigError("the prompt has no tokens")
    prompt_ids, max_new_tokens = fit_context(prompt_ids, gen.max_new_tokens, lm.language_model.context_length,
                                             opts.truncate, renderer)
    beams = cfg.num_beams > 1
    models.ensure_fits(lm, cfg.num_beams if beams else gen.num_samples, prompt_ids.shape[1], max_new_tokens,
                       f"--num-beams {cfg.num_beams}" if beams else f"-n {gen.num_samples}", beams)
    samples = range(gen.num_samples)
    hidden = control_token_ids(lm.tokenizer)  # printed as nothing; kept in the JSON ids
    model_cfg = for_model(lm, cfg)
    sampler = Sampler(model_cfg, state=grammar.bind(model_cfg, lm.tokenizer, eos_ids(lm, prompt.mode == chat.CHAT)),
                      sync_free=lm.device.type == "cuda")  # CUDA: never wait within a step
    forces = force.resolve(opts.force, encoder(lm.tokenizer), vocab_size(lm))
    for late in (f for f in forces if f.step > max_new_tokens):  # the context left less room than asked for
        renderer.warn(f"--force {late.spec!r} has no effect: generation stops after {max_new_tokens} tokens here")
    run = _Decoding(lm, prompt_ids, sampler, max_new_tokens,
                    [] if opts.ignore_eos else eos_ids(lm, prompt.mode == chat.CHAT),
                    list(gen.stop), [events.SampleRecord(i) for i in samples], renderer, opts.candidates,
                    {"load_s": load_s, "device": device, "dtype": dtype, "first_token_s": None,
                     "engine": lm.engine, "quantize": lm.quantize, "decode_kernel": lm.decode_kernel,
                     "decode_kernel_note": lm.decode_kernel_note},
                    stops=[StopMatcher(gen.stop) for _ in samples],
                    detoks=[IncrementalDetokenizer(lm.tokenizer, prompt_ids[0].tolist(), hidden) for _ in samples],
                    forces=forces)
    if forces:
        for record in run.records:
            record.forced = []
    state = DecodeState(gen.num_samples)

    decode_start = time.perf_counter()
    if cfg.num_beams > 1:
        interrupted, failure = _until_stopped(lambda: _decode_beams(run, decode_start), device)
    else:
        interrupted, failure = _until_stopped(
            lambda: _decode_samples(run, state, seed, opts.settings.schedule, decode_start), device)
    elapsed = time.perf_counter() - decode_start
    if isinstance(failure, SamplingError):  # from a damaged cache? Its checksums say; the next run heals it
        failure = models.damaged_cache_error(lm) or failure
    _finish_records(run, state, cfg.num_beams > 1, "error" if failure else interrupted[0] if interrupted else None)
    _check_complete(run)

    new_tokens = sum(len(r.token_ids) for r in run.records)
    run.stats.update(phase_stats(run.stats.get("prefill_s"), elapsed, prompt_ids.shape[1] * run.rows, new_tokens),
                     new_tokens=new_tokens, finish_reason=run.records[0].finish_reason, **peak_memory(device))
    run.stats.update(grammar_cut_stats(run.records))
    settings = cfg.to_dict() | {"max_new_tokens": max_new_tokens, "stop": run.stops_text,
                                "num_samples": gen.num_samples, "chain": run.sampler.describe(),
                                "schedule": [[e.from_token, e.temperature] for e in opts.settings.schedule],
                                "force": [f.to_dict(lm.tokenizer.decode([f.token_id])) for f in forces],
                                "ignore_eos": opts.ignore_eos}
    summary = events.summary(opts.prompt, run.records, settings, {
        "seed": seed, "model": lm.name, "device": device, "dtype": dtype,
        "finish_reason": run.records[0].finish_reason, "stats": run.stats, "prompt_format": prompt.mode,
    } | ({"rendered_prompt": prompt.text, "system": opts.system} if prompt.mode == chat.CHAT else {}) | ({"complete": run.records[0].complete} if run.records[0].complete is not None else {}))
    renderer.finish(summary)
    if opts.stats:
        renderer.note(format_stats(run.stats))
    if failure:
        raise failure
    if interrupted:
        raise Interrupted(interrupted[0], interrupted[1])
    return summary


def _until_stopped(decode: Any, device: str) -> tuple[Optional[tuple[str, ExitCode]], Optional[LlmsampleError]]:
    """Run the decode loop; Ctrl-C, SIGTERM, unusable logits and out-of-memory end it but keep what it made."""
    try:
        with _sigterm_raises():
            decode()
        return None, None
    except KeyboardInterrupt:
        return ("interrupted", ExitCode.INTERRUPTED), None
    except _Terminated:
        return ("terminated", ExitCode.TERMINATED), None
    except SamplingError as exc:
        return None, exc
    except (RuntimeError, MemoryError) as exc:  # CUDA's and the CPU allocator's out-of-memory, Python's MemoryError
        if not is_out_of_memory(exc):
            raise
        return None, out_of_memory(device)


def _decode_samples(run: _Decoding, state: Any, seed: int, schedule: Any, decode_start: float) -> None:
    """Sampled or greedy decoding of all samples as one batch, streaming each token to the renderer."""
    import torch

    from llmsample import force
    from llmsample.decode import ForceRefused, sample_loop

    tokenizer = run.lm.tokenizer
    samples = len(run.records)
    run.renderer.start(samples, streaming=samples == 1)
    generator = torch.Generator(device=run.lm.device).manual_seed(seed)
    loop = sample_loop(run.lm.language_model, run.prompt_ids.expand(samples, -1), run.sampler, run.max_new_tokens,
                       run.stop_ids, generator=generator, state=state,
                       schedule=(lambda i: temperature_at(schedule, i)) if schedule else None,
                       trace_top_n=run.candidates, progress=_phase_reporter(run, decode_start),
                       force=force.by_index(run.forces))
    try:
        for step in loop:
            if run.stats["first_token_s"] is None:
                run.stats["first_token_s"] = time.perf_counter() - decode_start
            with process.signals_held():  # a token is recorded and streamed, or neither: the summary matches the stream
                _record_step(run, step, state, tokenizer)
    except ForceRefused as exc:
        spec = next(f.spec for f in run.forces if f.step == exc.index + 1)
        token = tokenizer.decode([exc.token_id])
        raise ConfigError(f"--force {spec!r}: the {grammar_name(run.sampler.config)} does not allow {token!r} "
                          f"(token {exc.token_id}) at step {exc.index + 1}") from None


PHASE_LABELS = {"prompt": "reading the prompt", "beam": "beam search"}


def _phase_reporter(run: _Decoding, decode_start: float) -> Any:
    """The decode loop's progress callback: a bar on stderr for a slow phase, and the prefill's end for --stats."""
    from llmsample.render import PhaseBar

    bars: dict[str, PhaseBar] = {}

    def report(phase: str, done: int, total: int) -> None:
        if phase == "prompt" and done >= total:
            run.stats["prefill_s"] = time.perf_counter() - decode_start
        if phase not in bars:
            bars[phase] = PhaseBar(run.renderer.err, PHASE_LABELS.get(phase, phase))
        bars[phase].update(done, total)

    return report


def phase_stats(prefill_s: Optional[float], elapsed: float, prompt_tokens: int, new_tokens: int) -> dict[str, Any]:
    """Reading the prompt and generating, apart: tokens, seconds and tokens per second of each.

    The prefill is the forward over the prompt (every row's copy of it); decoding is the rest, each generated
    token's draw and the forwards after the first.

    >>> phase_stats(0.5, 2.5, 100, 40)["prefill_tokens_per_s"], phase_stats(0.5, 2.5, 100, 40)["tokens_per_s"]
    (200.0, 20.0)
    """
    prefill_s = elapsed if prefill_s is None else min(prefill_s, elapsed)  # no prefill end heard: all of it
    decode_s = elapsed - prefill_s
    return {"prefill_tokens": prompt_tokens, "prefill_s": prefill_s,
            "prefill_tokens_per_s": prompt_tokens / prefill_s if prefill_s > 0 else 0.0,
            "decode_s": decode_s, "tokens_per_s": new_tokens / decode_s if decode_s > 0 else 0.0}


def _record_step(run: _Decoding, step: Any, state: Any, tokenizer: Any) -> None:
    for row in step.active.nonzero().flatten().tolist():
        record = run.records[row]
        token_id = int(step.token_ids[row])
        record.token_ids.append(token_id)
        record.raw_probs.append(float(step.raw_prob[row]))
        record.probs.append(float(step.prob[row]))
        record.temperatures.append(step.temperature)
        record.entropies.append(float(step.entropy[row]))
        forced = step.forced is not None and bool(step.forced[row])
        table = candidates_dict(step.trace, row, tokenizer, token_id) if step.trace else None
        if table is not None:
            if forced:
                table["forced"] = True
            record.candidates.append(table)
        decided = events.stage_state(step.record, row)
        for key, value in decided.items():
            record.stage_state.setdefault(key, []).append(value)
        if record.forced is not None:
            record.forced.append(forced)
        emitted, stopped = run.stops[row].feed(run.detoks[row].add(token_id))
        record.text += emitted
        run.renderer.token(row, step.index, token_id, emitted, record.raw_probs[-1], record.probs[-1],
                           step.temperature, table, decided | {"forced": True} if forced else decided)
        if stopped:
            state.finish(row, "stop")


def _decode_beams(run: _Decoding, decode_start: float) -> None:
    """Beam search; the hypotheses become the records (no streaming: the best beam is known only at the end)."""
    from llmsample.decode import beam_search
    from llmsample.detok import StopMatcher
    from llmsample.token_text import decode_text

    tokenizer = run.lm.tokenizer
    length_penalty = run.sampler.config.length_penalty
    run.renderer.start(len(run.records), streaming=False)

    def on_trace(step: int, trace: Any, scores: Any, length: int) -> None:
        beams = [
            {"beam": b, "score": float(scores[b]),
             "normalised": float(scores[b]) / (length**length_penalty) if length else float(scores[b]),
             "candidates": candidates_dict(trace, b, tokenizer, None)}
            for b in range(len(scores)) if float(scores[b]) > -1e8  # beams not started yet
        ]
        run.renderer.beam_step(step, beams)

    hypotheses = beam_search(run.lm.language_model, run.prompt_ids, run.sampler, run.max_new_tokens, run.stop_ids,
                             num_return_sequences=len(run.records), trace_top_n=run.candidates, on_trace=on_trace,
                             progress=_phase_reporter(run, decode_start))
    run.stats["first_token_s"] = time.perf_counter() - decode_start
    for record, hyp in zip(run.records, hypotheses):
        text = decode_text(tokenizer, hyp.token_ids)
        emitted, stopped = StopMatcher(run.stops_text).feed(text)
        record.text = emitted if stopped else text
        record.token_ids = hyp.token_ids
        record.finish_reason = "stop" if stopped else hyp.finish_reason
        record.score = hyp.score


def _finish_records(run: _Decoding, state: Any, beams: bool, cut_short: Optional[str]) -> None:
    """Flush held-back text, settle every sample's finish reason, and hand each to the renderer."""
    for row, record in enumerate(run.records):
        if beams:
            if cut_short:
                record.finish_reason = cut_short
        else:
            reason = state.finish_reasons[row]
            if reason != "stop":
                tail, stopped = run.stops[row].feed(run.detoks[row].flush())
                tail += "" if stopped else run.stops[row].flush()
                record.text += tail
                run.renderer.tail(row, tail)
                reason = "stop" if stopped else reason
            record.finish_reason = reason or cut_short or "length"
        run.renderer.sample_done(record)


def _check_complete(run: _Decoding) -> None:
    """With a constraint: mark each sample complete or not, and warn (one line) when one is not."""
    constraint = run.sampler.state.get("grammar")
    if constraint is None:
        return
    for record in run.records:
        record.complete = constraint.complete(record.token_ids)
    cut = [r for r in run.records if not r.complete]
    if cut:
        which = "the output" if len(run.records) == 1 else "sample" + ("s " if len(cut) > 1 else " ") + ", ".join(
            str(r.index + 1) for r in cut)
        reason = cut[0].finish_reason
        run.renderer.warn(f"{which} ended ({reason}) before the {grammar_name(run.sampler.config)} was complete: "
                          "it does not satisfy it (raise --max-new-tokens)")


def grammar_name(cfg: Any) -> str:
    from llmsample import grammar

    kind = (grammar.active(cfg) or ("grammar", None))[0]
    return {"json_schema": "JSON schema", "grammar": "grammar", "regex": "regex", "choice": "choice"}[kind]


def grammar_cut_stats(records: list[events.SampleRecord]) -> dict[str, float]:
    """The raw probability mass the constraint removed per step, over every sample: mean and worst step."""
    cuts = [cut for record in records for cut in record.stage_state.get("grammar_cut", [])]
    if not cuts:
        return {}
    return {"grammar_cut_mean": sum(cuts) / len(cuts), "grammar_cut_max": max(cuts)}


@contextlib.contextmanager
def cache_checked(lm: Any) -> Iterator[None]:
    """Unusable logits from a damaged model cache become that error (and the damage is removed), as in generate."""
    from llmsample import models

    try:
        yield
    except SamplingError as exc:
        damaged = models.damaged_cache_error(lm)
        if damaged is None:
            raise
        raise damaged from exc


def peak_memory(device: str) -> dict[str, float]:
    """Peak resident memory of this process (MiB), and of the CUDA allocator when on a GPU."""
    import resource

    peak = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if device.startswith("cuda"):
        import torch

        peak["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


def out_of_memory(device: str) -> OutOfMemory:
    return OutOfMemory(f"{device} ran out of memory: {OUT_OF_MEMORY_ADVICE}")


def quiet_broken_pipe() -> None:
    """After the reader closed stdout: point it at /dev/null so the final flush at exit stays silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass

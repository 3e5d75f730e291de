"""The decode loops: the model's forward with a KV cache, the shared ``Sampler``, stop conditions.

They yield step records and never print; rendering is the consumer's job.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch

from llmsample.errors import SamplingError
from llmsample.sampling import Sampler, StepTrace
from llmsample.sampling.beam import BeamSearch, Hypothesis

# Given the number of tokens generated so far, the temperature for the next one (None = the config's own).
TemperatureSchedule = Callable[[int], Optional[float]]


@dataclass
class Step:
    """One decoding step over the batch: ``[batch]`` tensors, on the CPU."""

    index: int  # 0 for the first generated token
    token_ids: torch.Tensor
    prob: torch.Tensor  # under the processed distribution
    raw_prob: torch.Tensor  # model softmax at T=1
    active: torch.Tensor  # bool: rows still generating (a finished row's token is padding)
    temperature: float
    entropy: torch.Tensor  # nats, of each row's processed distribution
    trace: Optional[StepTrace] = None  # what each stage did to the top candidates, when asked for
    record: dict = field(default_factory=dict)  # what stateful stages decided ("xtc", "mirostat_mu"), [batch] each


@dataclass
class DecodeState:
    """Shared with the consumer: it may finish rows (a stop string) while the loop runs."""

    batch: int
    finish_reasons: list[Optional[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.finish_reasons = [None] * self.batch

    def finish(self, row: int, reason: str) -> None:
        if self.finish_reasons[row] is None:
            self.finish_reasons[row] = reason

    @property
    def all_finished(self) -> bool:
        return all(reason is not None for reason in self.finish_reasons)


_CACHE_KEYWORD: dict[type, str] = {}
_KEEPS_LOGITS: dict[type, bool] = {}


def _cache_keyword(model) -> str:
    """transformers 5.24 renamed the forward's ``past_key_values`` to ``cache`` (the old name warns)."""
    kind = type(model)
    if kind not in _CACHE_KEYWORD:
        parameters = inspect.signature(model.forward).parameters
        _CACHE_KEYWORD[kind] = "cache" if "cache" in parameters else "past_key_values"
        _KEEPS_LOGITS[kind] = "logits_to_keep" in parameters
    return _CACHE_KEYWORD[kind]


def _forward(model, input_ids: torch.Tensor, past) -> tuple[torch.Tensor, object]:
    keyword = _cache_keyword(model)
    # Only the last position's logits: a transformers model otherwise returns [batch, prompt, vocab] for a prompt.
    keep = {"logits_to_keep": 1} if _KEEPS_LOGITS[type(model)] else {}
    out = model(input_ids=input_ids, use_cache=True, **{keyword: past}, **keep)
    return out.logits[:, -1, :], out.past_key_values


@torch.inference_mode()
def sample_loop(
    model,
    input_ids: torch.Tensor,
    sampler: Sampler,
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    generator: Optional[torch.Generator] = None,
    state: Optional[DecodeState] = None,
    schedule: Optional[TemperatureSchedule] = None,
    trace_top_n: int = 0,
) -> Iterator[Step]:
    """Greedy or sampled decoding of ``input_ids`` (``[batch, prompt_len]``, one row per sample).

    Yields one ``Step`` per generated position. Rows end on EOS, at ``max_new_tokens``, or when the consumer calls
    ``state.finish(row, reason)``.
    """
    batch, prompt_len = input_ids.shape
    state = state or DecodeState(batch)
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=input_ids.device)
    pad = int(eos[0]) if len(eos) else 0
    samplers: dict[float, Sampler] = {}
    sequence = input_ids
    logits, past = _forward(model, sequence, None)  # prefill: [batch, vocab]
    for index in range(max_new_tokens):
        # Pick this step's sampler: a schedule may change the temperature from some token on.
        step_sampler = sampler
        temperature = sampler.config.temperature
        if schedule is not None:
            scheduled = schedule(index)
            if scheduled is not None and scheduled != temperature:
                temperature = scheduled
                if scheduled not in samplers:
                    samplers[scheduled] = Sampler(sampler.config.replace(temperature=scheduled), state=sampler.state)
                step_sampler = samplers[scheduled]
        try:
            choice = step_sampler.step(sequence, logits, generator=generator, prompt_len=prompt_len)
        except SamplingError as exc:
            raise SamplingError(f"{exc}, at generated token {index + 1}") from None
        trace = step_sampler.trace(sequence, logits, trace_top_n, prompt_len=prompt_len) if trace_top_n else None
        active = torch.tensor([reason is None for reason in state.finish_reasons], device=sequence.device)
        tokens = torch.where(active, choice.token_ids, torch.full_like(choice.token_ids, pad))
        yield Step(
            index=index,
            token_ids=tokens.cpu(),
            prob=choice.prob.cpu(),
            raw_prob=choice.raw_prob.cpu(),
            active=active.cpu(),
            temperature=temperature,
            entropy=choice.entropy.cpu(),
            trace=trace,
            record={key: value.cpu() for key, value in choice.record.items()},
        )
        for row in (active & torch.isin(tokens, eos)).nonzero().flatten().tolist():
            state.finish(row, "eos")
        if state.all_finished:
            return
        if index + 1 == max_new_tokens:
            break
        sequence = torch.cat((sequence, tokens[:, None]), dim=1)  # [batch, length + 1]
        logits, past = _forward(model, tokens[:, None], past)
    for row in range(batch):
        state.finish(row, "length")


@torch.inference_mode()
def beam_search(
    model,
    input_ids: torch.Tensor,
    sampler: Sampler,
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    num_return_sequences: int = 1,
    trace_top_n: int = 0,
    on_trace: Optional[Callable[[int, StepTrace, torch.Tensor, int], None]] = None,
) -> list[Hypothesis]:
    """Beam search from one prompt (``[1, prompt_len]``); returns the best hypotheses, best first.

    With ``trace_top_n``, ``on_trace(step, trace, running_scores, generated_length)`` gets the candidates of every
    running beam before each step (for the candidate tables).
    """
    num_beams = sampler.config.num_beams
    prompt_len = input_ids.shape[1]
    search = BeamSearch(sampler, prompt_len, max_new_tokens, eos_token_ids, num_return_sequences)
    sequences = input_ids.expand(num_beams, -1).contiguous()  # [beams, prompt_len]
    logits, past = _forward(model, sequences, None)
    step = 0
    while True:
        if trace_top_n and on_trace is not None:
            trace = sampler.trace(sequences, logits, trace_top_n, prompt_len=prompt_len)
            on_trace(step, trace, search.running_scores.clone(), sequences.shape[1] - prompt_len)
        step += 1
        try:
            order, tokens = search.step(sequences, logits)
        except SamplingError as exc:
            raise SamplingError(f"{exc}, at generated token {sequences.shape[1] - prompt_len + 1}") from None
        if search.done:
            break
        sequences = torch.cat((sequences[order], tokens[:, None]), dim=1)
        past.reorder_cache(order)
        logits, past = _forward(model, tokens[:, None], past)
    return search.results()

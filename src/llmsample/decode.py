"""The decode loops: the model's forward with a KV cache, the shared ``Sampler``, stop conditions.

They yield step records and never print; rendering is the consumer's job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch

from llmsample.errors import ConfigError, SamplingError
from llmsample.language_model import LanguageModel, wrap
from llmsample.sampling import Sampler, StepTrace
from llmsample.sampling.sampler import ForcedTokenRefused
from llmsample.sampling.beam import BeamSearch, Hypothesis

# Given the number of tokens generated so far, the temperature for the next one (None = the config's own).
TemperatureSchedule = Callable[[int], Optional[float]]
# Told how far a slow phase has gone: ("prompt", positions read, prompt length) while the prompt is read, and
# ("beam", steps done, most steps) during beam search. The prompt's last call marks the end of the prefill.
PhaseProgress = Callable[[str, int, int], None]


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
    forced: Optional[torch.Tensor] = None  # [batch] bool at a step with a forced token (``force``), else None


class ForceRefused(ConfigError):
    """A forced token that the constraint does not allow at its step (exit 2)."""

    def __init__(self, index: int, token_id: int):
        super().__init__(f"the constraint does not allow token {token_id} at generated token {index + 1}")
        self.index, self.token_id = index, token_id


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


def _phase(progress: Optional[PhaseProgress], phase: str) -> Optional[Callable[[int, int], None]]:
    return None if progress is None else lambda done, total: progress(phase, done, total)


@torch.inference_mode()
def sample_loop(
    model: LanguageModel,
    input_ids: torch.Tensor,
    sampler: Sampler,
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    generator: Optional[torch.Generator] = None,
    state: Optional[DecodeState] = None,
    schedule: Optional[TemperatureSchedule] = None,
    trace_top_n: int = 0,
    progress: Optional[PhaseProgress] = None,
    force: Optional[Mapping[int, int]] = None,
) -> Iterator[Step]:
    """Greedy or sampled decoding of ``input_ids`` (``[batch, prompt_len]``, one row per sample) with ``model``
    (a ``LanguageModel``, or a loaded module, which is wrapped).

    Yields one ``Step`` per generated position. Rows end on EOS, at ``max_new_tokens``, or when the consumer calls
    ``state.finish(row, reason)``. ``force`` maps a step index (0 = the first generated token) to the token id
    every active row takes there instead of its draw (``Sampler.step``'s ``force``; ``ForceRefused`` when the
    constraint does not allow it).
    """
    model = wrap(model)
    batch, prompt_len = input_ids.shape
    state = state or DecodeState(batch)
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=input_ids.device)
    pad = int(eos[0]) if len(eos) else 0
    samplers: dict[float, Sampler] = {}
    sequence = input_ids
    past = model.new_cache(batch, prompt_len + max_new_tokens)  # a static one where the engine has it
    logits, past = model.forward(sequence, past, progress=_phase(progress, "prompt"))  # prefill: [batch, vocab]
    for index in range(max_new_tokens):
        # Pick this step's sampler: a schedule may change the temperature from some token on.
        step_sampler = sampler
        temperature = sampler.config.temperature
        if schedule is not None:
            scheduled = schedule(index)
            if scheduled is not None and scheduled != temperature:
                temperature = scheduled
                if scheduled not in samplers:
                    samplers[scheduled] = Sampler(sampler.config.replace(temperature=scheduled), state=sampler.state,
                                                  sync_free=sampler.sync_free)
                step_sampler = samplers[scheduled]
        active = torch.tensor([reason is None for reason in state.finish_reasons], device=sequence.device)
        forced = None
        if force and index in force:  # the active rows take this token instead of their draw
            forced = torch.where(active, force[index], -1)
        try:
            choice = step_sampler.step(sequence, logits, generator=generator, prompt_len=prompt_len, force=forced,
                                       stats=model.row_stats(logits))
            step_sampler.raise_if_invalid(logits, choice)  # a sync-free step's check, now that tokens are read
        except SamplingError as exc:
            raise SamplingError(f"{exc}, at generated token {index + 1}") from None
        except ForcedTokenRefused as exc:
            raise ForceRefused(index, exc.token_ids[0]) from None
        trace = step_sampler.trace(sequence, logits, trace_top_n, prompt_len=prompt_len,
                                   extra_ids=None if forced is None else choice.token_ids) if trace_top_n else None
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
            forced=None if choice.forced is None else choice.forced.cpu(),
        )
        for row in (active & torch.isin(tokens, eos)).nonzero().flatten().tolist():
            state.finish(row, "eos")
        if state.all_finished:
            return
        if index + 1 == max_new_tokens:
            break
        sequence = torch.cat((sequence, tokens[:, None]), dim=1)  # [batch, length + 1]
        logits, past = model.forward(tokens[:, None], past)
    for row in range(batch):
        state.finish(row, "length")


@torch.inference_mode()
def beam_search(
    model: LanguageModel,
    input_ids: torch.Tensor,
    sampler: Sampler,
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    num_return_sequences: int = 1,
    trace_top_n: int = 0,
    on_trace: Optional[Callable[[int, StepTrace, torch.Tensor, int], None]] = None,
    progress: Optional[PhaseProgress] = None,
) -> list[Hypothesis]:
    """Beam search from one prompt (``[1, prompt_len]``); returns the best hypotheses, best first.

    With ``trace_top_n``, ``on_trace(step, trace, running_scores, generated_length)`` gets the candidates of every
    running beam before each step (for the candidate tables).
    """
    model = wrap(model)
    num_beams = sampler.config.num_beams
    prompt_len = input_ids.shape[1]
    search = BeamSearch(sampler, prompt_len, max_new_tokens, eos_token_ids, num_return_sequences)
    sequences = input_ids.expand(num_beams, -1).contiguous()  # [beams, prompt_len]
    past = model.new_cache(num_beams, prompt_len + max_new_tokens)
    logits, past = model.forward(sequences, past, progress=_phase(progress, "prompt"))
    step = 0
    while True:
        if progress is not None:
            progress("beam", step, max_new_tokens)
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
        past = model.reorder(past, order)
        logits, past = model.forward(tokens[:, None], past)
    return search.results()

"""Beam search bookkeeping for one prompt: pure torch, no model.

The rules are transformers' (``GenerationMixin._beam_search``), so that the same model gives the same best
sequence: scores are sums of log-probabilities after the sampler's penalty stages (applied to the log-softmax,
as transformers does); at each step the 2·num_beams best continuations over all beams are taken; a continuation
that ends (EOS or the length limit) among the top num_beams becomes a finished hypothesis with score
``sum_logprobs / generated_length ** length_penalty`` (prompt excluded, EOS included); ``early_stopping`` is
True (stop when num_beams hypotheses are finished), False (stop when no running beam can beat the worst finished
one at its current length) or "never" (as False, but judged at the longest possible length when
length_penalty > 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from llmsample.config import SamplingConfig  # noqa: F401 (used by the doctest)
from llmsample.sampling.sampler import Sampler

# transformers marks impossible beams with this score rather than −inf, so that arithmetic stays finite;
# the same constant keeps ties and orderings identical to it.
IMPOSSIBLE = -1.0e9


@dataclass(frozen=True)
class Hypothesis:
    """A finished beam: ``token_ids`` are the generated ids (prompt excluded)."""

    token_ids: list[int]
    score: float  # length-normalised
    sum_logprobs: float
    finish_reason: str  # "eos" or "length"


class BeamSearch:
    """Step-by-step beam search over ``num_beams`` rows; the caller runs the model and reorders its cache.

    >>> bs = BeamSearch(Sampler(SamplingConfig(num_beams=2)), 1, max_new_tokens=1, num_return_sequences=2)
    >>> _ = bs.step(torch.tensor([[5], [5]]), torch.tensor([[0.0, 2.0, 1.0]] * 2))
    >>> bs.done  # one new token was allowed
    True
    >>> [h.token_ids for h in bs.results()]
    [[1], [2]]
    """

    def __init__(
        self,
        sampler: Sampler,
        prompt_len: int,
        max_new_tokens: int,
        eos_token_ids: Sequence[int] = (),
        num_return_sequences: int = 1,
    ):
        cfg = sampler.config
        if not 1 <= num_return_sequences <= cfg.num_beams:
            raise ValueError(
                f"num_return_sequences must be in [1, {cfg.num_beams}] (num_beams), got {num_return_sequences}"
            )
        self.sampler = sampler
        self.num_beams = cfg.num_beams
        self.length_penalty = cfg.length_penalty
        self.early_stopping: Union[bool, str] = cfg.early_stopping
        self.prompt_len = prompt_len
        self.max_new_tokens = max_new_tokens
        self.eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long)
        self.num_return_sequences = num_return_sequences
        self.keep = max(2, 1 + len(self.eos)) * self.num_beams
        # Only the first beam starts alive, so the first step does not pick the same token num_beams times.
        self.running_scores = torch.full((self.num_beams,), IMPOSSIBLE)
        self.running_scores[0] = 0.0
        self.finished_scores = torch.full((self.num_beams,), IMPOSSIBLE)
        self.finished_flags = torch.zeros(self.num_beams, dtype=torch.bool)
        self.finished: list[Optional[Hypothesis]] = [None] * self.num_beams
        self.improvable = True
        self.done = False

    def step(self, sequences: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance one token.

        ``sequences``: ``[num_beams, length]`` prompt + generated ids; ``logits``: ``[num_beams, vocab]``.
        Returns ``(beam_order, tokens)``: the next running beams are ``sequences[beam_order]`` followed by
        ``tokens``; the caller reorders its KV cache with ``beam_order``. Check ``done`` afterwards.
        """
        device = logits.device
        length = sequences.shape[1]
        generated = length + 1 - self.prompt_len  # including the token chosen now
        vocab = logits.shape[-1]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        log_probs = self.sampler.process(sequences, log_probs, prompt_len=self.prompt_len)
        totals = (log_probs + self.running_scores.to(device)[:, None]).reshape(-1)
        top_scores, top_index = torch.topk(totals, self.keep)
        top_scores, top_index = top_scores.cpu(), top_index.cpu()
        beams, tokens = top_index // vocab, top_index % vocab

        is_eos = torch.isin(tokens, self.eos)
        at_limit = generated >= self.max_new_tokens
        ends = is_eos | at_limit

        # Finished hypotheses: only the top num_beams continuations count.
        full = bool(self.finished_flags.all()) and self.early_stopping is True
        if not full and self.improvable:
            normalised = top_scores / (generated**self.length_penalty)
            for i in range(self.num_beams):
                if not ends[i]:
                    continue
                self._offer(
                    float(normalised[i]),
                    Hypothesis(
                        sequences[beams[i], self.prompt_len :].tolist() + [int(tokens[i])],
                        float(normalised[i]),
                        float(top_scores[i]),
                        "eos" if is_eos[i] else "length",
                    ),
                )

        # Running beams: the best continuations that did not end.
        running = top_scores + ends.float() * IMPOSSIBLE
        chosen = torch.topk(running, self.num_beams).indices
        self.running_scores = running[chosen]
        beam_order, next_tokens = beams[chosen], tokens[chosen]

        self._update_done(length + 1, all_end=bool(ends.all()))
        return beam_order.to(device), next_tokens.to(device)

    def _offer(self, score: float, hypothesis: Hypothesis) -> None:
        # Merge into the num_beams best finished hypotheses, as transformers' topk over the merged scores does:
        # the newcomer must beat the worst slot strictly.
        worst = int(torch.argmin(self.finished_scores))
        if score > float(self.finished_scores[worst]):
            self.finished_scores[worst] = score
            self.finished_flags[worst] = True
            self.finished[worst] = hypothesis

    def _update_done(self, length: int, all_end: bool) -> None:
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_length = self.max_new_tokens
        else:
            best_length = length - self.prompt_len
        best_running = float(self.running_scores[0]) / (best_length**self.length_penalty)
        worst_finished = float(self.finished_scores.min()) if bool(self.finished_flags.all()) else IMPOSSIBLE
        self.improvable = self.improvable and best_running > worst_finished
        all_finished_and_stop = bool(self.finished_flags.all()) and self.early_stopping is True
        self.done = (not self.improvable) or all_finished_and_stop or all_end

    def results(self) -> list[Hypothesis]:
        """The best ``num_return_sequences`` finished hypotheses, best first."""
        found = [h for h in self.finished if h is not None]
        found.sort(key=lambda h: h.score, reverse=True)
        return found[: self.num_return_sequences]

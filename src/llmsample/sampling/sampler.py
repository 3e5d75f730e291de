"""The chain of stages built from a ``SamplingConfig``, and the one selector that turns scores into ids."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from llmsample.sampling import registry, stages
from llmsample.sampling.candidates import Candidates
from llmsample.sampling.stages import History, Stage


@dataclass(frozen=True)
class Choice:
    """The tokens picked at one step, ``[batch]`` each."""

    token_ids: torch.Tensor  # long
    prob: torch.Tensor  # probability under the processed distribution (1.0 for greedy's pick at T=0)
    raw_prob: torch.Tensor  # model softmax at T=1, before any stage
    entropy: torch.Tensor  # nats, of the processed distribution
    record: dict = field(default_factory=dict)  # what stateful stages decided: "xtc" fired, "mirostat_mu" [batch]


@dataclass(frozen=True)
class StepTrace:
    """What each stage did to the top-n tokens by raw probability, for the candidate tables.

    Shapes: ``token_ids``, ``raw_probs``, ``final_probs``: ``[batch, n]``; ``stage_probs``: ``[batch, stages, n]``
    (0 where the token was removed); ``kept``: ``[batch, stages]`` survivors after each stage;
    ``removed_by[b][i]``: the stage that removed token i of row b, or ``None`` if it survived.
    """

    stage_names: tuple[str, ...]
    token_ids: torch.Tensor
    raw_probs: torch.Tensor
    stage_probs: torch.Tensor
    final_probs: torch.Tensor
    kept: torch.Tensor
    removed_by: list[list[Optional[str]]]
    raw_mass_outside: torch.Tensor  # [batch] raw probability of everything not in the table

    def to_dict(self, row: int = 0) -> dict:
        """One row as plain JSON-ready data."""
        return {
            "stages": list(self.stage_names),
            "kept": self.kept[row].tolist(),
            "raw_mass_outside": float(self.raw_mass_outside[row]),
            "candidates": [
                {
                    "token_id": int(self.token_ids[row, i]),
                    "raw_prob": float(self.raw_probs[row, i]),
                    "stage_probs": [float(x) for x in self.stage_probs[row, :, i]],
                    "final_prob": float(self.final_probs[row, i]),
                    "removed_by": self.removed_by[row][i],
                }
                for i in range(self.token_ids.shape[1])
            ],
        }


class Sampler:
    """Runs the configured chain of stages and selects the next token.

    The stages come from the registry (``llmsample.sampling.registry``); ``config`` is a ``SamplingConfig``.
    Stages that keep state across steps (mirostat's μ) keep it in ``state``, one per sampler unless shared.

    >>> from llmsample.config import SamplingConfig
    >>> s = Sampler(SamplingConfig(do_sample=True, top_k=2, temperature=0.5))
    >>> s.describe()
    'logits -> top_k -> temperature -> dist'
    >>> s.process(torch.tensor([[5]]), torch.tensor([[1.0, 3.0, 2.0]]))
    tensor([[-inf, 6., 4.]])
    """

    def __init__(self, config: Any, check_finite: bool = True, state: Optional[dict] = None):
        if config.needs_tokenizer():
            raise ValueError("the settings still hold texts (logit bias, bans or DRY breakers): turn them into "
                             "token ids first with config.tokenized(encode)")
        self.config = config
        self.check_finite = check_finite
        self.state: dict = {} if state is None else state
        self.last_record: dict = {}
        self.stage_names: tuple[str, ...] = registry.active_stages(config)
        self._stages: list[Stage] = [registry.build_stage(name, config) for name in self.stage_names]
        last = self._stages[-1] if self._stages else None
        self._after_draw = getattr(last, "after_draw", None)

    # ---- the chain -------------------------------------------------------------------------------------------

    def describe(self) -> str:
        """The chain in order, e.g. ``logits -> penalties -> top_k -> top_p -> temperature -> dist``."""
        return self.config.describe_chain()

    def _run(self, input_ids: torch.Tensor, logits: torch.Tensor, prompt_len: int,
             generator: Optional[torch.Generator] = None, replay: Optional[dict] = None) -> tuple[History, Candidates]:
        history, c = self._start(input_ids, logits, prompt_len, generator, replay)
        raw = c
        for stage in self._stages:
            c = stage(c, history)
        return history, _keep_best_if_emptied(c, raw)

    def candidates(self, input_ids: torch.Tensor, logits: torch.Tensor, prompt_len: int = 0,
                   generator: Optional[torch.Generator] = None) -> Candidates:
        """Run the chain; the survivors come back compacted when a stage bounded them."""
        return self._run(input_ids, logits, prompt_len, generator)[1]

    def process(self, input_ids: torch.Tensor, logits: torch.Tensor, prompt_len: int = 0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``[batch, vocab]`` processed logits, −inf where a stage removed the token."""
        return self.candidates(input_ids, logits, prompt_len, generator).dense()

    # ---- selection -------------------------------------------------------------------------------------------

    def sample(
        self,
        input_ids: torch.Tensor,
        logits: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        prompt_len: int = 0,
    ) -> torch.Tensor:
        """``[batch]`` next token ids: argmax when greedy, else one draw from the processed distribution."""
        history, c = self._run(input_ids, logits, prompt_len, generator)
        return c.to_vocab(self._draw(c, generator, history))

    def step(
        self,
        input_ids: torch.Tensor,
        logits: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        prompt_len: int = 0,
    ) -> Choice:
        """Pick the next tokens and report their processed and raw probabilities (what the decode loop needs)."""
        history, c = self._run(input_ids, logits, prompt_len, generator)
        columns = self._draw(c, generator, history)
        log_probs = torch.log_softmax(c.logits, dim=-1)
        prob = log_probs.gather(1, columns.unsqueeze(1)).squeeze(1).exp()
        entropy = -(log_probs.exp() * log_probs).nansum(-1)
        token_ids = c.to_vocab(columns)
        raw = logits.float()
        raw_prob = torch.exp(raw.gather(1, token_ids.unsqueeze(1)).squeeze(1) - torch.logsumexp(raw, dim=-1))
        return Choice(token_ids, prob, raw_prob, entropy, history.record)

    def _draw(self, c: Candidates, generator: Optional[torch.Generator], history: History) -> torch.Tensor:
        """Select columns, let a selector with state (mirostat) learn from the draw, keep the step's record."""
        columns = self._select_columns(c, generator)
        if self._after_draw is not None:
            self._after_draw(c, columns, history)
        self.last_record = history.record
        return columns

    def select(self, c: Candidates, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Turn processed candidates into ``[batch]`` token ids (no selector state is updated)."""
        return c.to_vocab(self._select_columns(c, generator))

    def _select_columns(self, c: Candidates, generator: Optional[torch.Generator]) -> torch.Tensor:
        if self.config.greedy:
            return c.logits.argmax(-1)
        return draw(c.logits, generator)

    # ---- tracing ---------------------------------------------------------------------------------------------

    def trace(self, input_ids: torch.Tensor, logits: torch.Tensor, top_n: int = 10, prompt_len: int = 0,
              replay: Optional[dict] = None) -> StepTrace:
        """Follow the top-n tokens by raw probability through every active stage.

        Stages that draw or keep state repeat what ``replay`` recorded (default: the last ``step``), so a trace
        taken after a step shows that step's decisions.
        """
        history, c = self._start(input_ids, logits, prompt_len, None, self.last_record if replay is None else replay)
        raw_probs_all = torch.softmax(c.logits, dim=-1)
        n = min(top_n, raw_probs_all.shape[-1])
        raw_probs, token_ids = torch.topk(raw_probs_all, n, dim=-1)
        batch = token_ids.shape[0]
        removed_by: list[list[Optional[str]]] = [[None] * n for _ in range(batch)]
        stage_probs, kept = [], []
        alive = torch.ones_like(token_ids, dtype=torch.bool)
        for name, stage in zip(self.stage_names, self._stages):
            c = stage(c, history)
            dense = c.dense()
            probs = torch.softmax(dense, dim=-1).gather(1, token_ids)
            now_alive = torch.isfinite(dense.gather(1, token_ids))
            for b, i in (alive & ~now_alive).nonzero().tolist():
                removed_by[b][i] = name
            alive = now_alive
            stage_probs.append(probs)
            kept.append(torch.isfinite(dense).sum(-1))
        final = stage_probs[-1] if stage_probs else raw_probs
        return StepTrace(
            stage_names=self.stage_names,
            token_ids=token_ids,
            raw_probs=raw_probs,
            stage_probs=torch.stack(stage_probs, dim=1) if stage_probs else raw_probs.new_zeros(batch, 0, n),
            final_probs=final,
            kept=torch.stack(kept, dim=1) if kept else token_ids.new_zeros(batch, 0),
            removed_by=removed_by,
            raw_mass_outside=(1.0 - raw_probs.sum(-1)).clamp(min=0.0),
        )

    # ---- internals -------------------------------------------------------------------------------------------

    def _start(self, input_ids: torch.Tensor, logits: torch.Tensor, prompt_len: int,
               generator: Optional[torch.Generator], replay: Optional[dict]) -> tuple[History, Candidates]:
        if logits.dim() != 2:
            raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
        if input_ids.dim() != 2 or input_ids.shape[0] != logits.shape[0]:
            raise ValueError(
                f"input_ids must be [batch, length] with batch {logits.shape[0]}, got shape {tuple(input_ids.shape)}"
            )
        if not 0 <= prompt_len <= input_ids.shape[1]:
            raise ValueError(f"prompt_len must be in [0, {input_ids.shape[1]}], got {prompt_len}")
        logits = logits.float()  # fp16/bf16 logits are processed in float32; float32 input is not copied
        if self.check_finite:
            stages.check_logits(logits)
        history = History(input_ids, prompt_len, generator=generator, replay=replay, state=self.state,
                          raw_logits=logits)
        return history, Candidates.from_logits(logits)


def _keep_best_if_emptied(c: Candidates, raw: Candidates) -> Candidates:
    """The documented fallback: a row the chain left without any token keeps its best raw token.

    no_repeat_ngram already does this for its bans; this catches the rest (a penalty that overflowed every
    logit of a row to −inf).
    """
    emptied = torch.isneginf(c.logits.amax(-1))
    if not bool(emptied.any()):
        return c
    dense = c.dense().clone()
    rows = emptied.nonzero().flatten()
    best = raw.logits[rows].argmax(-1)
    dense[rows, best] = 0.0
    return Candidates.from_logits(dense)


def draw(logits: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One draw per row from softmax(logits) by inverse CDF: ``[batch, n]`` → ``[batch]`` column indices.

    One uniform number per row and a cumulative sum: no ``multinomial`` over the vocabulary. A removed
    (−inf) column has an empty interval, so it is never drawn.
    """
    probs = torch.softmax(logits, dim=-1)
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=logits.device, dtype=cdf.dtype)
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=logits.shape[-1] - 1)

"""The chain of stages built from a ``SamplingConfig``, and the one selector that turns scores into ids."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from llmsample.sampling import narrow, registry, stages
from llmsample.sampling.candidates import Candidates
from llmsample.sampling.constraint import unpack
from llmsample.sampling.row_stats import RowStats
from llmsample.sampling.stages import History, Stage


@dataclass(frozen=True)
class Choice:
    """The tokens picked at one step, ``[batch]`` each."""

    token_ids: torch.Tensor  # long
    prob: torch.Tensor  # probability under the processed distribution (1.0 for greedy's pick at T=0)
    raw_prob: torch.Tensor  # model softmax at T=1, before any stage
    entropy: torch.Tensor  # nats, of the processed distribution
    record: dict = field(default_factory=dict)  # what stateful stages decided: "xtc" fired, "mirostat_mu" [batch]
    valid: Optional[torch.Tensor] = None  # sync-free samplers: 0-d bool, the logits were usable (else raise)
    forced: Optional[torch.Tensor] = None  # [batch] bool: the row took a forced token instead of its draw


class ForcedTokenRefused(ValueError):
    """A forced token that the constraint (grammar stage) does not allow at this step."""

    def __init__(self, rows: list[int], token_ids: list[int]):
        super().__init__(f"the constraint does not allow token {token_ids[0]} here (batch row {rows[0]})")
        self.rows, self.token_ids = rows, token_ids


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
    # With ``extra_ids`` (a forced token shown even when it is not among the top n): the last column is that token,
    # and ``extra_repeats[b]`` says it is already one of row b's top n (the column is then left out of the row).
    extra_repeats: Optional[torch.Tensor] = None

    def columns(self, row: int = 0) -> range:
        """The columns of row ``row`` to show: every one, less a repeated extra token."""
        n = self.token_ids.shape[1]
        repeated = self.extra_repeats is not None and bool(self.extra_repeats[row])
        return range(n - 1 if repeated else n)

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
                for i in self.columns(row)
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

    def __init__(self, config: Any, check_finite: bool = True, state: Optional[dict] = None, sync_free: bool = False):
        if config.needs_tokenizer():
            raise ValueError("the settings still hold texts (logit bias, bans or DRY breakers): turn them into "
                             "token ids first with config.tokenized(encode)")
        self.config = config
        self.check_finite = check_finite
        # Never read a value back to the host within a step (for CUDA): the stages take their fixed-shape paths,
        # and unusable logits are reported through ``Choice.valid`` instead of raising at once.
        self.sync_free = sync_free
        self.state: dict = {} if state is None else state
        self.last_record: dict = {}
        self.stage_names: tuple[str, ...] = registry.active_stages(config)
        self._stages: list[Stage] = [registry.build_stage(name, config) for name in self.stage_names]
        last = self._stages[-1] if self._stages else None
        self._after_draw = getattr(last, "after_draw", None)
        self._keeps_a_token = all(registry.STAGES[name].keeps_a_token for name in self.stage_names)

    # ---- the chain -------------------------------------------------------------------------------------------

    def describe(self) -> str:
        """The chain in order, e.g. ``logits -> penalties -> top_k -> top_p -> temperature -> dist``."""
        return self.config.describe_chain()

    def _run(self, input_ids: torch.Tensor, logits: torch.Tensor, prompt_len: int,
             generator: Optional[torch.Generator] = None, replay: Optional[dict] = None,
             stats: Optional[RowStats] = None) -> tuple[History, Candidates]:
        token = stages._SYNC_FREE.set(self.sync_free)
        try:
            history, c = self._start(input_ids, logits, prompt_len, generator, replay, stats)
            raw = c
            for stage in self._stages:
                c = stage(c, history)
            # Rows checked finite: unchanged, or changed only by stages that keep a token, none was emptied.
            if history.raw_max is not None and (c is raw or self._keeps_a_token):
                return history, c
            return history, _keep_best_if_emptied(c, raw)
        finally:
            stages._SYNC_FREE.reset(token)

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
        if self._narrow_draw(c, None):
            self.last_record = history.record
            picked, u = _draw_on_host(c, generator, entropy=False)
            if picked is None:
                return c.to_vocab(draw(c.logits, generator, u=u))
            return narrow.as_tensor([_vocab_ids(c, [column for column, _, _ in picked])], torch.long,
                                    c.logits.device)[0]
        return c.to_vocab(self._draw(c, generator, history))

    def step(
        self,
        input_ids: torch.Tensor,
        logits: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        prompt_len: int = 0,
        force: Optional[torch.Tensor] = None,
        stats: Optional[RowStats] = None,
    ) -> Choice:
        """Pick the next tokens and report their processed and raw probabilities (what the decode loop needs).

        ``force`` (``[batch]`` long, −1 = draw): the rows whose token is given instead of drawn. The draw still
        runs, so it takes its random numbers and the steps after use the same stream as a run without the force;
        the stages with state (mirostat's μ) learn from the forced token as if it had been drawn, and its
        probability is the one the chain gave it (0 when a stage removed it). ``ForcedTokenRefused`` when the
        constraint does not allow a forced token. ``stats``: the logits' ``RowStats``, when the engine computed them
        (nothing then passes over the raw row again for its maximum, normaliser, entropy or greedy's pick).
        """
        history, c = self._run(input_ids, logits, prompt_len, generator, stats=stats)
        u = None
        if self._narrow_draw(c, force):
            picked, u = _draw_on_host(c, generator)
            if picked is not None:
                return self._narrow_choice(c, history, picked)
        # The draw's softmax serves the token's probability and the entropy too.
        probs = None if self.config.greedy else torch.softmax(c.logits, dim=-1)
        if self.config.greedy and history.raw_stats is not None and c.logits is history.raw_logits:
            columns = history.raw_stats.argmax
        elif u is not None:
            columns = draw(c.logits, generator, probs, u)
        else:
            columns = self._select_columns(c, generator, probs)
        forced = removed = None
        if force is not None:
            force = force.to(c.logits.device)
            forced = force >= 0
            self._check_constraint(history, c, force, forced)
            forced_columns, present = _column_of(c, force.clamp(min=0))
            removed = forced & ~present
            columns = torch.where(forced, forced_columns, columns)
        token_ids = c.to_vocab(columns)
        if forced is not None:  # a forced token the chain removed is not among the columns
            token_ids = torch.where(forced, force, token_ids)
        if self._after_draw is not None:
            self._after_draw(c, columns, history, removed=removed, token_ids=token_ids)
        self.last_record = history.record
        prob, entropy = self._prob_and_entropy(c, columns, history, probs)
        if removed is not None:  # its probability under the chain is 0
            prob = torch.where(removed, torch.zeros_like(prob), prob)
        log_total = history.raw_log_normaliser(quick=True).squeeze(1)
        raw_prob = torch.exp(history.raw_logits.gather(1, token_ids.unsqueeze(1)).squeeze(1) - log_total)
        valid = torch.isfinite(log_total).all() if self.sync_free and self.check_finite else None
        return Choice(token_ids, prob, raw_prob, entropy, history.record, valid, forced)

    def _narrow_draw(self, c: Candidates, force: Optional[torch.Tensor]) -> bool:
        """Whether this step's draw is decided on the host (``narrow``): sampled rows with few survivors, on the
        CPU, no forced token, no selector that learns from the draw (mirostat), no sync-free step."""
        return (not self.config.greedy and force is None and self._after_draw is None and not self.sync_free
                and c.logits.numel() <= narrow.HOST_LIMIT and c.logits.device.type == "cpu")

    def _narrow_choice(self, c: Candidates, history: History, picked: list[tuple[int, float, float]]) -> Choice:
        """The ``Choice`` for the columns, probabilities and entropies ``narrow.draw`` picked."""
        ids = _vocab_ids(c, [column for column, _, _ in picked])
        self.last_record = history.record
        raw_values = history.raw_logits[list(range(len(ids))), ids].tolist()
        log_totals = history.raw_log_normaliser(quick=True).flatten().tolist()
        raw_probs = [math.exp(value - log_total) for value, log_total in zip(raw_values, log_totals)]
        device = c.logits.device
        numbers = narrow.as_tensor([[prob for _, prob, _ in picked], raw_probs,
                                    [entropy for _, _, entropy in picked]], device=device)
        return Choice(narrow.as_tensor([ids], torch.long, device)[0], numbers[0], numbers[1], numbers[2],
                      history.record)

    def _check_constraint(self, history: History, c: Candidates, force: torch.Tensor, forced: torch.Tensor) -> None:
        """``ForcedTokenRefused`` when the grammar stage runs and forbids a forced token (reads back: only at a
        forced step)."""
        constraint = self.state.get("grammar")
        if constraint is None or "grammar" not in self.stage_names:
            return
        allowed = unpack(constraint.allowed_bits(history.generated), c.vocab_size).to(force.device)
        ok = allowed.gather(1, force.clamp(min=0).unsqueeze(1)).squeeze(1) | ~forced
        if not bool(ok.all()):
            rows = (~ok).nonzero().flatten().tolist()
            raise ForcedTokenRefused(rows, [int(force[r]) for r in rows])

    def raise_if_invalid(self, logits: torch.Tensor, choice: Choice) -> None:
        """After a sync-free step, once its tokens are read anyway: the error ``check_logits`` would have raised."""
        if choice.valid is not None and not bool(choice.valid):
            stages.diagnose_logits(logits.float())

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

    def _select_columns(self, c: Candidates, generator: Optional[torch.Generator],
                        probs: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.config.greedy:
            return c.logits.argmax(-1) if self.sync_free else stages.first_argmax(c.logits)
        return draw(c.logits, generator, probs)

    @staticmethod
    def _dense_wide(c: Candidates) -> bool:
        """A row no stage compacted, wider than the stages filter in place: one softmax is worth sharing."""
        return c.is_dense and c.logits.shape[-1] > stages.SMALL_ROW

    def _prob_and_entropy(self, c: Candidates, columns: torch.Tensor, history: History,
                          probs: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``[batch]`` processed probability of each row's column and the processed distribution's entropy.

        A wide dense row (greedy, a temperature alone) takes one softmax (``stages.wide_entropy``: ``probs``, when
        the draw has it). When the row is the raw one, its normaliser is the raw probability's too, so that is not
        computed again.
        """
        logits = c.logits
        if not self._dense_wide(c):
            if probs is None:
                probs = torch.softmax(logits, dim=-1)
            # −p·log p of the softmax's own p (0 for a removed token): one operation where log_softmax, a product
            # and a NaN-skipping sum took three, each a cold dispatch after the model's step
            return probs.gather(1, columns.unsqueeze(1)).squeeze(1), torch.special.entr(probs).sum(-1)
        if history.raw_stats is not None and logits is history.raw_logits:  # the engine's, for the raw row
            stats, at = history.raw_stats, columns.unsqueeze(1)
            prob = probs.gather(1, at) if probs is not None else torch.exp(logits.gather(1, at) - stats.log_total)
            return prob.squeeze(1), stats.entropy
        entropy, log_total, probs = stages.wide_entropy(logits, probs, history.row_max(c),
                                                        finite=False if self.sync_free else None)
        if logits is history.raw_logits and history.raw_log_total is None:
            history.raw_log_total_quick = log_total
        return probs.gather(1, columns.unsqueeze(1)).squeeze(1), entropy.squeeze(1)

    # ---- tracing ---------------------------------------------------------------------------------------------

    def trace(self, input_ids: torch.Tensor, logits: torch.Tensor, top_n: int = 10, prompt_len: int = 0,
              replay: Optional[dict] = None, extra_ids: Optional[torch.Tensor] = None) -> StepTrace:
        """Follow the top-n tokens by raw probability through every active stage.

        Stages that draw or keep state repeat what ``replay`` recorded (default: the last ``step``), so a trace
        taken after a step shows that step's decisions. ``extra_ids`` (``[batch]``, a forced token) is followed
        too, as a last column, in the rows where it is not among the top n.
        """
        history, c = self._start(input_ids, logits, prompt_len, None, self.last_record if replay is None else replay)
        raw_probs_all = torch.softmax(c.logits, dim=-1)
        n = min(top_n, raw_probs_all.shape[-1])
        raw_probs, token_ids = torch.topk(raw_probs_all, n, dim=-1)
        repeats = None
        if extra_ids is not None:
            extra = extra_ids.to(token_ids.device).unsqueeze(1)  # [batch, 1]
            repeats = (token_ids == extra).any(-1)
            token_ids = torch.cat((token_ids, extra), dim=1)
            raw_probs = torch.cat((raw_probs, raw_probs_all.gather(1, extra)), dim=1)
        batch, width = token_ids.shape
        removed_by: list[list[Optional[str]]] = [[None] * width for _ in range(batch)]
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
            stage_probs=torch.stack(stage_probs, dim=1) if stage_probs else raw_probs.new_zeros(batch, 0, width),
            final_probs=final,
            kept=torch.stack(kept, dim=1) if kept else token_ids.new_zeros(batch, 0),
            removed_by=removed_by,
            raw_mass_outside=(1.0 - raw_probs[:, :n].sum(-1) - (0.0 if repeats is None else torch.where(
                repeats, 0.0, raw_probs[:, n]))).clamp(min=0.0),
            extra_repeats=repeats,
        )

    # ---- internals -------------------------------------------------------------------------------------------

    def _start(self, input_ids: torch.Tensor, logits: torch.Tensor, prompt_len: int,
               generator: Optional[torch.Generator], replay: Optional[dict],
               stats: Optional[RowStats] = None) -> tuple[History, Candidates]:
        if logits.dim() != 2:
            raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
        if input_ids.dim() != 2 or input_ids.shape[0] != logits.shape[0]:
            raise ValueError(
                f"input_ids must be [batch, length] with batch {logits.shape[0]}, got shape {tuple(input_ids.shape)}"
            )
        if not 0 <= prompt_len <= input_ids.shape[1]:
            raise ValueError(f"prompt_len must be in [0, {input_ids.shape[1]}], got {prompt_len}")
        logits = logits.float()  # fp16/bf16 logits are processed in float32; float32 input is not copied
        # The check is one max per row (no exponential): it is finite exactly when the row has no NaN (max
        # propagates it), no +inf and a finite value. The raw log-normaliser waits until something needs it.
        row_max = None
        if self.sync_free:
            stats = None  # its paths take no shortcut that reads a value back
        if self.check_finite and not self.sync_free:
            row_max = logits.amax(-1, keepdim=True) if stats is None else stats.top  # temperature reuses it
            if (stats is None or not stats.finite) and not bool(torch.isfinite(row_max).all()):
                stages.diagnose_logits(logits)
        history = History(input_ids, prompt_len, generator=generator, replay=replay, state=self.state,
                          raw_logits=logits, raw_max=row_max, raw_stats=stats,
                          raw_log_total_quick=None if stats is None else stats.log_total)
        return history, Candidates.from_logits(logits)


def _draw_on_host(c: Candidates, generator: Optional[torch.Generator],
                  entropy: bool = True) -> tuple[Optional[list[tuple[int, float, float]]], torch.Tensor]:
    """``narrow.draw``'s picks for ``c``'s rows (None: the tensor draw decides, with the same uniform numbers) and
    the uniform numbers it took."""
    u = uniforms(c.logits, generator)
    return narrow.draw(c.logits.tolist(), u.flatten().tolist(), entropy), u


def _vocab_ids(c: Candidates, columns: list[int]) -> list[int]:
    """The vocabulary ids of one column per row, as plain numbers."""
    return columns if c.ids is None else [row[column] for row, column in zip(c.ids.tolist(), columns)]


def _column_of(c: Candidates, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[batch]`` column of each row's ``token_ids`` in ``c``, and whether the row holds it at all (a compacted
    row holds only its survivors). No read-back: fixed shapes, as the sync-free path needs."""
    if c.is_dense:
        return token_ids, torch.ones_like(token_ids, dtype=torch.bool)
    match = c.ids == token_ids.unsqueeze(1)  # [batch, n]
    return match.int().argmax(-1), match.any(-1)


def _keep_best_if_emptied(c: Candidates, raw: Candidates) -> Candidates:
    """The documented fallback: a row the chain left without any token keeps its best raw token.

    no_repeat_ngram already does this for its bans, and the penalties keep finite logits finite; this catches the
    rest (a ban of every token by logit_bias, DRY's penalty overflowing, a selector). A chain whose every stage
    keeps a token (``StageSpec.keeps_a_token``) does not call it.
    """
    emptied = torch.isneginf(c.logits.amax(-1))
    if stages.sync_free():  # every row through the same ops: a row's best raw token where it was emptied
        dense = c.dense()
        best = torch.full_like(dense, float("-inf")).scatter_(1, raw.logits.argmax(-1, keepdim=True), 0.0)
        return Candidates.from_logits(torch.where(emptied[:, None], best, dense))
    if not bool(emptied.any()):
        return c
    dense = c.dense().clone()
    rows = emptied.nonzero().flatten()
    best = raw.logits[rows].argmax(-1)
    dense[rows, best] = 0.0
    return Candidates.from_logits(dense)


def uniforms(logits: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The ``[batch, 1]`` uniform numbers ``draw`` takes for these rows (drawn first by a caller that decides on
    the host, so that the stream of random numbers is the same either way)."""
    return torch.rand((logits.shape[0], 1), generator=generator, device=logits.device, dtype=logits.dtype)


def draw(logits: torch.Tensor, generator: Optional[torch.Generator] = None,
         probs: Optional[torch.Tensor] = None, u: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One draw per row from softmax(logits) by inverse CDF: ``[batch, n]`` → ``[batch]`` column indices.

    One uniform number per row and a cumulative sum: no ``multinomial`` over the vocabulary. A removed
    (−inf) column has an empty interval, so it is never drawn. ``probs``: ``softmax(logits)``, when the caller
    has it; ``u``: the row's uniform numbers (``uniforms``), when the caller drew them.
    """
    if probs is None:
        probs = torch.softmax(logits, dim=-1)
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    if u is None:
        u = uniforms(probs, generator)
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=logits.shape[-1] - 1)

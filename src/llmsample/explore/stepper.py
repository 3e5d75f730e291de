"""The model side of ``explore``: branches of steps over one prompt, and a KV cache kept in step with the path shown.

Every step keeps the logits it was taken from (``[1, vocab]``, on the model's device), and every branch the logits
of its next step. So undo, a branch switch and a changed setting need no forward pass: the table is recomputed from
logits already there. The cache follows lazily: before the next forward it is cut back to the longest prefix it
shares with the path (``rewind``: an O(1) cut for llmsample's own cache and transformers' ``crop``) and only the
tokens after that prefix are read. A cache that cannot be cut back (a transformers sliding-window layer past its
window) is rebuilt by reading the prompt and the path again. Branches share the steps of their common prefix (the
same objects), so a branch costs only its own steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from llmsample.config import SamplingConfig, Settings, temperature_at
from llmsample.detok import IncrementalDetokenizer, StopMatcher
from llmsample.errors import ConfigError

SAMPLED, CHOSEN, FORCED = "sampled", "chosen", "forced"
DEFAULT_ROWS = 10  # candidate rows shown when --candidates is not given


@dataclass
class TakenStep:
    """One generated token and everything the session file and the screen say about it."""

    token_id: int
    text: str  # the text this token completed ('' while a character is incomplete, or a control token)
    how: str  # SAMPLED | CHOSEN | FORCED
    raw_prob: float  # under the raw model (T=1)
    prob: float  # under the chain (0 where the chain removed it)
    settings: dict  # the resolved settings this step ran with (generate's JSON "settings" shape)
    candidates: dict  # the candidate table, the taken token marked (generate's JSON "candidates" entry)
    logits: torch.Tensor = field(repr=False)  # [1, vocab]: the distribution the token was taken from
    state_after: dict = field(default_factory=dict, repr=False)  # sampler state after this step (mirostat's μ)


@dataclass
class Branch:
    """A path from the prompt: its full list of steps (a fork shares its parent's steps up to ``fork_step``)."""

    id: int
    parent: Optional[int]
    fork_step: Optional[int]
    steps: list[TakenStep]
    next_logits: torch.Tensor = field(repr=False)  # [1, vocab]: the distribution of the step after the last

    @property
    def token_ids(self) -> list[int]:
        return [s.token_id for s in self.steps]


def rewind(cache: Any, length: int) -> bool:
    """Cut ``cache`` back to its first ``length`` positions, in place; False when it cannot be.

    llmsample's own cache only moves its length (what is after it is overwritten by the next forward);
    transformers' caches ``crop`` (a negative count: the positions to drop).
    """
    from llmsample.gemma3 import KVCache, StaticKVCache

    if isinstance(cache, KVCache):
        cache.length = length
        if isinstance(cache, StaticKVCache):
            cache.sync_position()
        return True
    crop = getattr(cache, "crop", None)
    if crop is None:
        return False
    try:
        crop(length - int(cache.get_seq_length()))
    except (RuntimeError, ValueError, NotImplementedError):
        return False
    return int(cache.get_seq_length()) == length


def settings_json(cfg: SamplingConfig, max_new_tokens: int, stops: list[str], schedule: tuple,
                  force: list[dict], ignore_eos: bool) -> dict:
    """The settings in the shape of generate's JSON ``settings`` (``force``: ``[{step, token_id, token}]``)."""
    return cfg.to_dict() | {"max_new_tokens": max_new_tokens, "stop": list(stops), "num_samples": 1,
                            "chain": cfg.describe_chain(),
                            "schedule": [[e.from_token, e.temperature] for e in schedule],
                            "force": force, "ignore_eos": ignore_eos}


class Explorer:
    """A session over one loaded model and prompt: sample, choose, undo, branch, switch, change settings.

    ``lm``: ``models.LoadedModel``; ``prompt_ids``: the ids fed (template and BOS included); ``settings``: the
    resolved settings; ``eos``: the ids that end a text (a constraint needs them even with ``ignore_eos``, which
    only keeps them from ending the branch); ``forces``: ``--force``'s ``{step index: token id}``, which
    ``sample`` takes at those steps; ``rows``: candidate rows per table; ``prompt_text``: the
    prompt as the model reads it (a chat template rendered), shown above the text; ``given_prompt``: as the user
    gave it (the session file's ``prompt``; default ``prompt_text``).
    """

    def __init__(self, lm: Any, prompt_ids: list[int], settings: Settings, seed: int, eos: list[int],
                 rows: int = DEFAULT_ROWS, prompt_text: str = "", given_prompt: Optional[str] = None,
                 ignore_eos: bool = False, forces: Optional[dict[int, int]] = None):
        from llmsample.token_text import control_token_ids

        self.lm = lm
        self.model = lm.language_model
        self.tokenizer = lm.tokenizer
        self.prompt_ids = list(prompt_ids)
        self.prompt_text = prompt_text
        self.given_prompt = prompt_text if given_prompt is None else given_prompt
        self.eos = list(eos)
        self.ignore_eos = ignore_eos
        self.forces = dict(forces or {})  # --force: {step index (0-based): token id}, taken by sample()
        self.rows = rows
        self.hidden = control_token_ids(self.tokenizer)
        self.seed = self.start_seed = seed
        self.generator = torch.Generator(device=self.model.device).manual_seed(seed)
        self.state: dict = {}  # the samplers' shared state: the bound grammar, mirostat's μ
        self.forward_s = 0.0  # time spent in the model's forward (for --stats)
        self.forwards = 0
        self._cache: Any = None
        self._cached: list[int] = []  # the ids the cache holds, in order
        self.start_settings: dict = {}
        self.configure(settings)
        self.start_settings = self.settings_json(self.settings.sampling)
        logits = self._forward(self.prompt_ids)
        self.branches = [Branch(0, None, None, [], logits)]
        self.current = 0
        self._preview: Optional[dict] = None
        self._detok: Optional[IncrementalDetokenizer] = None
        self._detok_at: tuple[int, int] = (-1, -1)  # (branch, steps) the detokeniser has read

    # ---- settings ------------------------------------------------------------------------------------------

    def configure(self, settings: Settings) -> None:
        """Use ``settings`` from the next step on; the current step's table is recomputed (no forward pass)."""
        from llmsample import grammar
        from llmsample.token_text import for_model

        cfg = settings.sampling
        model_cfg = for_model(self.lm, cfg)
        self.state = {k: v for k, v in self.state.items() if k != "grammar"}
        self.state.update(grammar.bind(model_cfg, self.tokenizer, self.eos))
        self.settings = settings
        self._samplers: dict[Optional[float], Any] = {}
        self._model_cfg = model_cfg
        self.max_new_tokens = settings.generation.max_new_tokens
        self.stops = list(settings.generation.stop)
        seed = settings.generation.seed
        if self.start_settings and seed is not None and seed != self.seed:  # `e seed N`: draws from here on
            self.seed = seed
            self.generator = torch.Generator(device=self.model.device).manual_seed(seed)
        self._preview = None

    def _step_config(self, index: int) -> tuple[SamplingConfig, Any]:
        """The settings and the sampler for generated step ``index`` (a temperature schedule may change them)."""
        from llmsample.sampling import Sampler

        scheduled = temperature_at(self.settings.schedule, index) if self.settings.schedule else None
        key = None if scheduled is None or scheduled == self.settings.sampling.temperature else scheduled
        cfg = self.settings.sampling if key is None else self.settings.sampling.replace(temperature=key)
        if key not in self._samplers:
            model_cfg = self._model_cfg if key is None else self._model_cfg.replace(temperature=key)
            self._samplers[key] = Sampler(model_cfg, state=self.state)
        return cfg, self._samplers[key]

    def settings_json(self, cfg: SamplingConfig) -> dict:
        force = [{"step": index + 1, "token_id": token, "token": self.tokenizer.decode([token])}
                 for index, token in sorted(self.forces.items())]
        return settings_json(cfg, self.max_new_tokens, self.stops, self.settings.schedule, force, self.ignore_eos)

    # ---- where the session is ------------------------------------------------------------------------------

    @property
    def branch(self) -> Branch:
        return self.branches[self.current]

    @property
    def index(self) -> int:
        """The generated step the next token will be (0 for the first)."""
        return len(self.branch.steps)

    def sequence(self, steps: Optional[list[TakenStep]] = None) -> torch.Tensor:
        """``[1, length]``: the prompt and the branch's tokens, as the sampler reads them."""
        ids = self.prompt_ids + [s.token_id for s in (self.branch.steps if steps is None else steps)]
        return torch.tensor([ids], dtype=torch.long, device=self.model.device)

    def finished(self) -> Optional[str]:
        """Why the current branch would stop on its own: ``eos``, ``stop`` (a stop string), ``length``, or None."""
        steps = self.branch.steps
        if steps and steps[-1].token_id in self.eos and not self.ignore_eos:
            return "eos"
        if self.stops and any(stop in self.text() for stop in self.stops):
            return "stop"
        if len(steps) >= self.max_new_tokens:
            return "length"
        return None

    def text(self, branch: Optional[Branch] = None, cut_at_stop: bool = False) -> str:
        """The branch's generated text (with ``cut_at_stop``: up to its first stop string, as generate prints)."""
        text = "".join(s.text for s in (branch or self.branch).steps) + self._tail(branch or self.branch)
        if cut_at_stop and self.stops:
            emitted, stopped = StopMatcher(self.stops).feed(text)
            return emitted if stopped else text
        return text

    def _tail(self, branch: Branch) -> str:
        """An incomplete character at the end, as generate's last flush shows it."""
        if not branch.steps or branch.steps[-1].text:
            return ""
        detok = IncrementalDetokenizer(self.tokenizer, self.prompt_ids, self.hidden)
        for step in branch.steps:
            detok.add(step.token_id)
        return detok.flush()

    # ---- the table -----------------------------------------------------------------------------------------

    def preview(self) -> dict:
        """The candidate table of the next step, nothing chosen yet (recomputed only when something changed)."""
        if self._preview is None:
            self._preview = self._table(self.branch.next_logits, self.index, chosen=None, replay={})
        return self._preview

    def _table(self, logits: torch.Tensor, index: int, chosen: Optional[int], replay: dict,
               extra: Optional[int] = None) -> dict:
        """A candidate table of step ``index``; ``extra``: a token followed too when it is not among the rows."""
        from llmsample.run import candidates_dict

        _, sampler = self._step_config(index)
        steps = self.branch.steps[:index]
        extra_ids = None if extra is None else torch.tensor([extra], device=logits.device)
        trace = sampler.trace(self.sequence(steps), logits, self.rows, prompt_len=len(self.prompt_ids),
                              replay=replay, extra_ids=extra_ids)
        return candidates_dict(trace, 0, self.tokenizer, chosen)

    # ---- taking a token ------------------------------------------------------------------------------------

    def sample(self) -> TakenStep:
        """Draw the next token with the current settings (greedy: the argmax) and take it; at a step given by
        ``--force`` the forced token is taken instead (the draw still runs, as in generate)."""
        if self.index in self.forces:
            return self.force(self.forces[self.index])
        cfg, sampler = self._step_config(self.index)
        logits = self.branch.next_logits
        choice = sampler.step(self.sequence(), logits, generator=self.generator, prompt_len=len(self.prompt_ids))
        token = int(choice.token_ids[0])
        if choice.record:  # a stage decided something at the draw (XTC fired, mirostat's μ): table that decision
            table = self._table(logits, self.index, token, dict(choice.record))
        else:
            table = _mark(self.preview(), token)
        return self._take(token, SAMPLED, float(choice.raw_prob[0]), float(choice.prob[0]), cfg, table)

    def choose(self, row: int) -> TakenStep:
        """Take the token in row ``row`` (0-based) of the next step's table instead of a draw."""
        table = self.preview()
        candidates = table["candidates"]
        if not 0 <= row < len(candidates):
            raise IndexError(f"the table has {len(candidates)} rows")
        chosen = candidates[row]
        cfg, _ = self._step_config(self.index)
        return self._take(chosen["token_id"], CHOSEN, chosen["raw_prob"], chosen["final_prob"], cfg,
                          _mark(table, chosen["token_id"]))

    def force(self, token_id: int) -> TakenStep:
        """Take ``token_id`` as ``generate --force`` does: the draw runs (its random number is used), stages with
        state learn from the token, its probability is the chain's (0 where a stage removed it); a constraint that
        forbids it is a ``ConfigError``."""
        from llmsample.sampling.sampler import ForcedTokenRefused

        cfg, sampler = self._step_config(self.index)
        logits = self.branch.next_logits
        try:
            choice = sampler.step(self.sequence(), logits, generator=self.generator,
                                  prompt_len=len(self.prompt_ids), force=torch.tensor([token_id]))
        except ForcedTokenRefused:
            text = self.tokenizer.decode([token_id])
            raise ConfigError(f"the constraint does not allow {text!r} (#{token_id}) at step {self.index + 1}") from None
        table = self.preview()
        if token_id not in [c["token_id"] for c in table["candidates"]] or choice.record:
            table = self._table(logits, self.index, token_id, dict(choice.record), extra=token_id)
        table = _mark(table, token_id) | {"forced": True}  # as generate's table of a forced step
        return self._take(token_id, FORCED, float(choice.raw_prob[0]), float(choice.prob[0]), cfg, table)

    def _take(self, token: int, how: str, raw_prob: float, prob: float, cfg: SamplingConfig, table: dict) -> TakenStep:
        branch = self.branch
        if len(branch.steps) >= self.max_new_tokens:
            raise LimitReached(f"the token limit ({self.max_new_tokens}) is reached: undo, or raise it with "
                               "'e max_new_tokens N'")
        text = self._detokenizer().add(token)
        step = TakenStep(token, text, how, raw_prob, prob, self.settings_json(cfg), table, branch.next_logits,
                         {k: v.clone() for k, v in self.state.items() if isinstance(v, torch.Tensor)})
        next_logits = self._forward(self.prompt_ids + branch.token_ids + [token])
        branch.steps.append(step)
        branch.next_logits = next_logits
        self._preview = None
        self._detok_at = (branch.id, len(branch.steps))
        return step

    def _detokenizer(self) -> IncrementalDetokenizer:
        """The detokeniser of the current path (rebuilt after an undo or a switch: a character split over several
        tokens needs the bytes before it)."""
        branch = self.branch
        if self._detok is None or self._detok_at != (branch.id, len(branch.steps)):
            self._detok = IncrementalDetokenizer(self.tokenizer, self.prompt_ids, self.hidden)
            for token_id in branch.token_ids:
                self._detok.add(token_id)
        return self._detok

    # ---- moving around -------------------------------------------------------------------------------------

    def undo(self) -> Optional[TakenStep]:
        """Drop the current branch's last step (None when it has none). No forward pass: its logits are kept."""
        branch = self.branch
        if not branch.steps:
            return None
        step = branch.steps.pop()
        branch.next_logits = step.logits
        self._restore_state()
        self._preview = None
        return step

    def fork(self) -> Branch:
        """Keep this path as it is and go on in a new branch from here (its steps shared up to now)."""
        parent = self.branch
        new = Branch(len(self.branches), parent.id, len(parent.steps), list(parent.steps), parent.next_logits)
        self.branches.append(new)
        self.current = new.id
        self._preview = None
        return new

    def switch(self, branch_id: Optional[int] = None) -> Branch:
        """Go to branch ``branch_id`` (default: the next one, round). The cache follows at the next forward."""
        self.current = (self.current + 1) % len(self.branches) if branch_id is None else branch_id
        self._restore_state()
        self._preview = None
        return self.branch

    def _restore_state(self) -> None:
        """The samplers' state as the branch's last step left it (mirostat's μ), or fresh at its start."""
        for key in [k for k, v in self.state.items() if isinstance(v, torch.Tensor)]:
            del self.state[key]
        if self.branch.steps:
            self.state.update({k: v.clone() for k, v in self.branch.steps[-1].state_after.items()})

    # ---- the model -----------------------------------------------------------------------------------------

    def _forward(self, ids: list[int]) -> torch.Tensor:
        """The logits after ``ids`` (``[1, vocab]``), reading only what the cache does not already hold."""
        start = time.perf_counter()
        common = 0
        limit = min(len(self._cached), len(ids) - 1)  # at least one token is read, to get its logits
        while common < limit and self._cached[common] == ids[common]:
            common += 1
        capacity = getattr(self._cache, "capacity", None)
        if self._cache is not None and capacity is not None and capacity < len(ids):
            self._cache, common = None, 0  # a static cache too small for a raised token limit: a bigger one
        if self._cache is not None and common < len(self._cached) and not rewind(self._cache, common):
            self._cache, common = None, 0  # this cache cannot be cut back: read everything again
        if self._cache is None:
            common = 0
            context = self.model.context_length or len(ids) + self.max_new_tokens
            self._cache = self.model.new_cache(1, min(context, len(self.prompt_ids) + max(self.max_new_tokens,
                                                                                          len(ids))))
        new = torch.tensor([ids[common:]], dtype=torch.long, device=self.model.device)
        with torch.inference_mode():
            logits, self._cache = self.model.forward(new, self._cache)
        self._cached = list(ids)
        self.forward_s += time.perf_counter() - start
        self.forwards += 1
        return logits.clone()  # a CUDA graph's output buffer is overwritten by its next replay

    # ---- the session file ----------------------------------------------------------------------------------

    def session(self) -> dict:
        """The whole session as the saved file's JSON object (see ``session_file``)."""
        from llmsample.explore import session_file

        return session_file.build(self)


class LimitReached(Exception):
    """The branch has as many tokens as the token limit allows."""


def _mark(table: dict, token_id: int) -> dict:
    """A copy of a candidate table with ``token_id`` marked chosen."""
    out = dict(table)
    out["candidates"] = [dict(c, chosen=c["token_id"] == token_id) for c in table["candidates"]]
    return out



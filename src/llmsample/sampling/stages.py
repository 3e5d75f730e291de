"""The sampling stages. Each maps ``Candidates`` to new ``Candidates`` and never modifies its input.

Every stage's math is the one in DESIGN.md §4; each docstring gives the neutral value and a tiny example.
Truncation stages find a per-row logit threshold and keep ``logits >= threshold``: probabilities are monotone in
the logits within a row, so that keeps ties at the boundary (as transformers' top_k does) and lets
``keep_from`` look at a small ``topk`` window instead of sorting the whole vocabulary.
"""

from __future__ import annotations

import contextvars
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from llmsample.sampling import narrow
from llmsample.sampling.candidates import NEG_INF, Candidates

# Rows at most this wide are filtered in place; wider dense rows are compacted through a growing topk window.
SMALL_ROW = 2048
FIRST_WINDOW = 256
WINDOW_GROWTH = 4
# A wide top_p whose nucleus outgrows the first window finds its cut from a histogram of the row's mass over
# logit bins (one pass) instead of a sort: only the tokens of the bin or two the cut falls in are sorted.
HISTOGRAM_SHIFT = 16  # a bin is a float32 probability's sign, exponent and top 7 mantissa bits
ONE_BITS = 0x3F800000 >> HISTOGRAM_SHIFT  # the bin of probability 1.0
HISTOGRAM_BINS = ONE_BITS + 1
HISTOGRAM_MIN_WIDTH = 16384
HISTOGRAM_AFTER_WINDOW = 4096  # the windows up to this one are cheaper when the nucleus fits
HISTOGRAM_SORT_LIMIT = 16384  # more tokens than this in the cut's bins (a nearly uniform row): sort instead
# keep_from compacts a wide row when at most this many survive: gathering more costs more than the later stages
# save by working on fewer columns.
COMPACT_LIMIT = 8192
# fast_topk splits a row into chunks, narrower for a larger k, and needs at least this many of them to pay off.
# From WIDE_K on, it gathers the k chunks with the largest maxima (64 values each, 32 from k = 1,024) and sorts
# only the gathered values that reach the k-th of those maxima, about k of them (at vocab 262,144: k = 1,024 in
# 0.38 ms against 0.60 for a topk over all gathered values and 0.99 for torch.topk over the row). Below it (top_k's
# own k) the widths and the topk are the earlier ones, which order tied values as before, so a seed draws the same
# of several tied tokens (half-precision logits tie often) as it did.
CHUNK = 256
MIN_CHUNK = 16
WIDE_K = 128
FAST_TOPK_MIN_CHUNKS = 64


Stage = Callable[[Candidates, "History"], Candidates]

# Set by a Sampler made with ``sync_free=True`` (CUDA) for the length of its chain: the stages then take their
# fixed-shape paths, which never read a value back to the host (no ``bool(tensor)``, no count that sizes a
# tensor). Each decides the same tokens; the compacting paths only save work where the host is the device.
_SYNC_FREE: contextvars.ContextVar[bool] = contextvars.ContextVar("sync_free", default=False)


def sync_free() -> bool:
    return _SYNC_FREE.get()


@dataclass
class History:
    """What a step is conditioned on: ``input_ids[:, :prompt_len]`` is the prompt.

    ``generator`` feeds the stages that draw (XTC). ``record`` collects what this step decided (whether XTC
    fired, mirostat's μ) and ``replay``, when given, makes the stages repeat a recorded step instead of deciding
    again (the candidate tables trace a step after it was taken). ``state`` lives as long as the sampler (μ).
    """

    input_ids: torch.Tensor  # [batch, length] long
    prompt_len: int = 0
    generator: Optional[torch.Generator] = None
    record: dict = field(default_factory=dict, repr=False)
    replay: Optional[dict] = field(default=None, repr=False)
    state: dict = field(default_factory=dict, repr=False)
    # The step's raw logits ([batch, vocab], the model's, before any stage). Their log-normaliser is a full pass
    # over the vocabulary, so it is computed once, on first use (the raw probability of a step's token, top_p on
    # the raw row), and a step that needs it nowhere (``Sampler.sample`` in transformers' order) never pays it.
    raw_logits: Optional[torch.Tensor] = field(default=None, repr=False)
    raw_log_total: Optional[torch.Tensor] = field(default=None, repr=False)
    raw_log_total_quick: Optional[torch.Tensor] = field(default=None, repr=False)  # quick_logsumexp's
    raw_max: Optional[torch.Tensor] = field(default=None, repr=False)  # [batch, 1], when the check computed it
    raw_stats: Optional[Any] = field(default=None, repr=False)  # the engine's RowStats of the raw logits, if any
    # (logits, RowStats) of a dense row a stage derived from the raw one, with its statistics derived from the
    # engine's (a repetition penalty: ``RowStats.lowered``)
    derived: Optional[tuple[torch.Tensor, Any]] = field(default=None, repr=False)

    def row_max(self, c: Candidates) -> torch.Tensor:
        """``[batch, 1]`` largest logit of ``c``'s rows: the one the finiteness check found, when ``c`` is the raw
        row unchanged (a row with derived statistics: theirs)."""
        if self.raw_max is not None and c.is_dense and c.logits is self.raw_logits:
            return self.raw_max
        stats = self.stats(c)
        return c.logits.amax(-1, keepdim=True) if stats is None else stats.top

    def chunk_maxima(self, c: Candidates) -> Optional[torch.Tensor]:
        """The engine's chunk maxima of ``c`` (``RowStats.chunk_maxima``) when ``c`` is the raw row unchanged."""
        stats = self.stats(c)
        return None if stats is None else stats.chunk_maxima

    def stats(self, c: Candidates) -> Optional[Any]:
        """The engine's ``RowStats`` of ``c`` when ``c`` is the raw row unchanged, or those derived from them for
        the row a stage made of it (``derived``); else None."""
        if not c.is_dense:
            return None
        if self.raw_stats is not None and c.logits is self.raw_logits:
            return self.raw_stats
        if self.derived is not None and c.logits is self.derived[0]:
            return self.derived[1]
        return None

    def listed(self, c: Candidates) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``c``'s highest logits and their columns (``[batch, n]`` each, sorted as ``fast_topk`` returns them)
        when the engine listed them (``stats``); else None."""
        stats = self.stats(c)
        return None if stats is None or stats.top_values is None else (stats.top_values, stats.top_columns)

    def raw_log_normaliser(self, quick: bool = False) -> torch.Tensor:
        """``logsumexp`` of the raw logits' rows, ``[batch, 1]``: computed on the first call, then reused.

        ``quick``: within float32 rounding is enough (a probability to report; top_p, whose cut tolerates it):
        the exact value if a stage already needed it, else ``quick_logsumexp`` (about two thirds of the time).
        """
        if self.raw_log_total is not None:
            return self.raw_log_total
        if quick:
            if self.raw_log_total_quick is None:
                self.raw_log_total_quick = quick_logsumexp(self.raw_logits, top=self.raw_max)
            return self.raw_log_total_quick
        self.raw_log_total = logsumexp(self.raw_logits)
        return self.raw_log_total

    def log_total(self, c: Candidates) -> Optional[torch.Tensor]:
        """``quick_logsumexp`` of ``c``'s rows, ``[batch, 1]``, when ``c`` is the raw row unchanged (or a row with
        derived statistics: theirs); else None."""
        if c.is_dense and c.logits is self.raw_logits:
            return self.raw_log_normaliser(quick=True)
        stats = self.stats(c)
        return None if stats is None else stats.log_total

    @property
    def generated(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len :]

    def window(self, last_n: int, start: int = 0) -> torch.Tensor:
        """The ids from position ``start`` on, only the last ``last_n`` of the sequence (-1 = no limit)."""
        length = self.input_ids.shape[1]
        if last_n >= 0:
            start = max(start, length - last_n)
        return self.input_ids[:, min(start, length) :]


def logsumexp(x: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(x, -1, keepdim=True)``, the same arithmetic with fewer passes and copies.

    A row's max is subtracted, the difference exponentiated in place and summed (a row whose max is infinite is
    shifted by 0 instead, so all −inf gives −inf and +inf gives +inf, as ``torch.logsumexp`` does). The fused
    softmax kernel would be faster, but its float32 running sums are ~1e-4 off on a 262,144-wide row.
    """
    top = x.amax(-1, keepdim=True)
    shift = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    return torch.sub(x, shift).exp_().sum(-1, keepdim=True).log_().add_(shift)


def quick_logsumexp(x: torch.Tensor, probs: Optional[torch.Tensor] = None,
                    top: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[batch, 1]`` logsumexp of wide rows within float32 rounding (≈1e-6 here), from their softmax (``probs``,
    computed here unless given): one exponential pass by the fused softmax kernel, 0.15 ms over 262,144 logits
    where ``logsumexp`` takes 0.28.

    The largest probability is 1/S (S the sum of exp(ℓ − max)), and the sum of the probabilities (torch's
    cascaded sum, accurate where the kernel's own float32 running sums are ≈1e-4 off on a wide row) corrects
    it. A row with NaN, +inf or nothing finite gives NaN or its infinite max, so a finiteness check still holds.
    ``top``: the rows' max, when the caller has it.
    """
    if x.shape[-1] <= SMALL_ROW and probs is None:
        return torch.logsumexp(x, dim=-1, keepdim=True)
    if probs is None:
        probs = torch.softmax(x, dim=-1)
    if top is None:
        top = x.amax(-1, keepdim=True)
    p_max = probs.amax(-1, keepdim=True).double()
    quick = (top.double() - p_max.log() + probs.sum(-1, keepdim=True).double().log()).float()
    return torch.where(torch.isinf(top), top, quick)


def row_finite(logits: torch.Tensor) -> bool:
    """Whether every logit is finite: one ``amin`` (nothing removed yet, no NaN; reads the value back)."""
    return bool(torch.isfinite(logits.amin()))


def wide_entropy(logits: torch.Tensor, probs: Optional[torch.Tensor] = None, top: Optional[torch.Tensor] = None,
                 finite: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[batch, 1]`` entropy (nats) of wide rows' softmax, their ``quick_logsumexp`` and the softmax itself, from
    one softmax (``probs``, computed here unless given; ``top``: the rows' max, when the caller has it).

    H = log S − Σp·ℓ / Σp: the sum over p because the fused kernel's normaliser is ~6e-5 off on a 262,144-wide
    row, which moves −Σp·log p from ``log_softmax`` by ~1e-4 nats; this is within ~1e-5 of float64, in 0.25 ms
    against 0.44. −inf logits count as the lowest float (0·(−inf) would be NaN). ``finite``: whether every logit
    is finite, when the caller knows (False clamps without looking, as a sync-free step must); None: looked up.
    """
    if probs is None:
        probs = torch.softmax(logits, dim=-1)
    log_total = quick_logsumexp(logits, probs, top)
    if finite is None:
        finite = not sync_free() and row_finite(logits)
    if not finite:
        logits = logits.clamp(min=torch.finfo(logits.dtype).min)
    # torch's cascaded sums (a BLAS dot's running float32 sum drifts by ~1e-3 over 262,144 terms)
    weighted = torch.mul(probs, logits).sum(-1, keepdim=True) / probs.sum(-1, keepdim=True)
    return log_total - weighted, log_total, probs


def kth_logit(c: Candidates, k: int) -> torch.Tensor:
    """``[batch, 1]``: each row's k-th largest logit (−inf when fewer than k are alive)."""
    k = min(k, c.logits.shape[-1])
    return fast_topk(c.logits, k)[0][:, k - 1 : k]


def protect(c: Candidates, threshold: torch.Tensor, min_keep: int,
            row_max: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Lower ``threshold`` so that at least ``min_keep`` tokens (and their ties) stay above it (``row_max``: the
    rows' largest logits, when the caller knows them)."""
    if min_keep <= 1:
        return torch.minimum(threshold, c.logits.amax(-1, keepdim=True) if row_max is None else row_max)
    return torch.minimum(threshold, kth_logit(c, min_keep))


def _table(ids: torch.Tensor, vocab_size: int, counts: bool) -> torch.Tensor:
    """``[batch, vocab]`` per-token count (float) or presence (bool) of ``ids``; ids past the vocab are dropped."""
    batch = ids.shape[0]
    spare = ids.clamp(max=vocab_size)  # ids the lm_head cannot produce land in a spare column
    if counts:
        out = torch.zeros(batch, vocab_size + 1, dtype=torch.float32, device=ids.device)
        out.scatter_add_(1, spare, torch.ones_like(spare, dtype=torch.float32))
    else:
        out = torch.zeros(batch, vocab_size + 1, dtype=torch.bool, device=ids.device)
        out.scatter_(1, spare, True)
    return out[:, :vocab_size]


def fast_topk(x: torch.Tensor, k: int, maxima: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(x, k)`` (sorted) for wide rows, through chunk maxima instead of a pass over every value.

    Split the row into chunks (256 values, halved while k is over a quarter of their number; 64 from k = 128, 32
    from k = 1,024) and let t be the k-th largest chunk maximum. Every value above t sits in one of the k chunks
    with the largest maxima, and those chunks hold at least k values ``>= t``; so topk over them (plus the ragged
    tail) returns exactly the k largest values, and every value left out is ``<= t <=`` the k-th returned: the
    guarantee ``torch.topk`` gives, which the callers' tie checks rely on. Which of several tied columns is
    returned may differ from ``torch.topk`` (as it may between its devices). ``maxima``: the maxima of the row's
    chunks of 256, when the caller has them (an engine's ``RowStats``), read instead of computed where those are the
    chunks.
    """
    batch, width = x.shape
    if k < WIDE_K:
        chunk = CHUNK
        while chunk > MIN_CHUNK and k > (width // chunk) // 4:  # a larger k: smaller chunks, so that few are read
            chunk //= 2
        limit = (width // chunk) // 4
    else:
        chunk = 64 if k < 1024 else 32
        limit = (width // chunk) // 2
    chunks = width // chunk
    if chunks < FAST_TOPK_MIN_CHUNKS or k > limit:
        return torch.topk(x, k, dim=-1)
    if maxima is None or chunk != CHUNK or maxima.shape != (batch, chunks):
        maxima = x[:, : chunks * chunk].reshape(batch, chunks, chunk).amax(-1)
    wide = k >= WIDE_K and not sync_free()
    maxima, best_chunks = torch.topk(maxima, k, dim=-1, sorted=not wide)  # [batch, k]
    offsets = torch.arange(chunk, device=x.device)
    columns = (best_chunks.unsqueeze(-1) * chunk + offsets).reshape(batch, -1)  # [batch, k*chunk]
    if width > chunks * chunk:
        tail = torch.arange(chunks * chunk, width, device=x.device).expand(batch, -1)
        columns = torch.cat((columns, tail), dim=-1)
    gathered = x.gather(1, columns)
    if wide:
        found = _sorted_from(gathered, columns, maxima.amin(-1, keepdim=True), k)
        if found is not None:
            return found
    values, picked = torch.topk(gathered, k, dim=-1)
    return values, columns.gather(1, picked)


def left_aligned(rows: torch.Tensor, counts: torch.Tensor, width: int, entries: torch.Tensor,
                 fill: float) -> torch.Tensor:
    """``[batch, width]``: each row's ``entries`` (one per item of ``rows``, row-major as ``nonzero`` gives them,
    ``counts[r]`` for row r) from column 0 on, in their order; ``fill`` after them.

    >>> left_aligned(torch.tensor([0, 0, 1]), torch.tensor([2, 1]), 2, torch.tensor([5, 6, 7]), -1)
    tensor([[ 5,  6],
            [ 7, -1]])
    """
    slots = torch.arange(rows.shape[0], device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
    out = torch.full((counts.shape[0], width), fill, dtype=entries.dtype, device=entries.device)
    out[rows, slots] = entries
    return out


def left_aligned_columns(rows: torch.Tensor, counts: torch.Tensor, width: int,
                         columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``columns`` (ascending within a row, as ``left_aligned`` takes entries) from slot 0 on, and which
    slots hold them (``[batch, width]`` each). A shorter row is padded with columns it does not hold, so that a
    compacted row's ids stay distinct (``Candidates.dense`` scatters them): the j-th column missing from a sorted
    c_0 < c_1 < … is j + #{i : c_i − i ≤ j}.

    >>> left_aligned_columns(torch.tensor([0, 0, 1]), torch.tensor([2, 1]), 2, torch.tensor([0, 3, 0]))
    (tensor([[0, 3],
            [0, 1]]), tensor([[ True,  True],
            [ True, False]]))
    """
    slots = torch.arange(width, device=rows.device)
    inside = slots < counts.unsqueeze(1)
    held = left_aligned(rows, counts, width, columns, 0)
    gaps = torch.where(inside, held - slots, torch.iinfo(held.dtype).max)
    j = (slots - counts.unsqueeze(1)).clamp_(min=0)
    return torch.where(inside, held, j + torch.searchsorted(gaps, j, right=True)), inside


AT_LEAST_CHUNK = 64  # at_least's chunks: narrow, so that the chunks a few hundred survivors touch are few values


def _blocks(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x``'s whole chunks of ``AT_LEAST_CHUNK`` columns (``[batch, chunks, AT_LEAST_CHUNK]``, a view) and how
    many columns they cover (the rest is the ragged end)."""
    body = x.shape[-1] - x.shape[-1] % AT_LEAST_CHUNK
    return x[:, :body].unflatten(1, (body // AT_LEAST_CHUNK, AT_LEAST_CHUNK)), body


def at_least(x: torch.Tensor, floor: torch.Tensor,
             limit: int = COMPACT_LIMIT) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Each row's columns where ``x >= floor`` (``[batch, 1]``), in column order, and the values there: two
    ``[batch, widest]`` tensors, left-aligned; a shorter row is padded with other columns (the first it does not
    hold) and −inf. ``None`` when a row has none or more than ``limit``.

    Through chunk maxima: one ``amax`` over chunks of 64, then only the chunks whose maximum reaches the floor
    are read (300 survivors of 262,144: 0.13 ms, where marking every value, counting and gathering took 0.5).
    ``x`` has no NaN (a chunk holding one is not read; a softmax is NaN everywhere or nowhere).

    >>> at_least(torch.tensor([[0.1, 0.5, 0.2, 0.7]]), torch.tensor([[0.2]]))
    (tensor([[1, 2, 3]]), tensor([[0.5000, 0.2000, 0.7000]]))
    """
    batch, width = x.shape
    blocks, body = _blocks(x)
    rows, chunks = (blocks.amax(-1) >= floor).nonzero(as_tuple=True)  # row-major, so each row's in column order
    if rows.numel() > limit * batch:  # every such chunk holds a survivor
        return None
    picked = blocks[rows, chunks]  # [chunks found, 64]
    hit, within = (picked >= floor[rows]).nonzero(as_tuple=True)
    row_of, columns, values = rows[hit], chunks[hit] * AT_LEAST_CHUNK + within, picked[hit, within]
    if body < width:  # the ragged end: read as it is, then put back in row-major order
        tail = x[:, body:]
        tail_rows, tail_at = (tail >= floor).nonzero(as_tuple=True)
        if tail_rows.numel():
            row_of, columns = torch.cat((row_of, tail_rows)), torch.cat((columns, tail_at + body))
            values = torch.cat((values, tail[tail_rows, tail_at]))
            if batch > 1:
                order = (row_of * width + columns).argsort()
                row_of, columns, values = row_of[order], columns[order], values[order]
    if batch == 1:
        return (columns.unsqueeze(0), values.unsqueeze(0)) if 0 < columns.numel() <= limit else None
    counts = torch.bincount(row_of, minlength=batch)
    fewest, widest = (int(v) for v in torch.aminmax(counts))
    if fewest < 1 or widest > limit:
        return None
    return left_aligned_columns(row_of, counts, widest, columns)[0], left_aligned(row_of, counts, widest, values,
                                                                                  NEG_INF)


def count_at_least(x: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """``[batch]``: ``(x >= floor).sum(-1)`` (``floor``: ``[batch, 1]``), reading only the chunks of 64 whose largest
    value reaches the floor when they are few (a boolean pass over a 262,144-wide row takes 0.11 ms here, its sum
    0.08 more; the chunks' maxima 0.04).

    >>> count_at_least(torch.tensor([[0.1, 0.5, 0.2, 0.7]]), torch.tensor([[0.2]]))
    tensor([3])
    """
    batch, width = x.shape
    blocks, body = _blocks(x)
    maxima = blocks.amax(-1)
    rows, chunks = (maxima >= floor).nonzero(as_tuple=True)
    # a NaN hides its chunk's other values from the maxima; many chunks: a pass over the row is as cheap
    if rows.numel() > COMPACT_LIMIT * batch // 8 or bool(torch.isnan(maxima).any()):
        return (x >= floor).sum(-1)
    counts = torch.zeros(batch, dtype=torch.long, device=x.device)
    counts.index_add_(0, rows, (blocks[rows, chunks] >= floor[rows]).sum(-1))
    if body < width:
        counts += (x[:, body:] >= floor).sum(-1)
    return counts


def _sorted_from(values: torch.Tensor, columns: torch.Tensor, floor: torch.Tensor,
                 k: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The k largest of ``values`` (and their ``columns``), sorted, from only those ``>= floor`` (``[batch, 1]``,
    the k-th largest chunk maximum): about k of the k·chunk gathered, so one small sort replaces a topk over all
    of them (at k = 1,024 of 262,144: 0.38 ms instead of 0.60). ``None`` if a row has fewer than k such values
    (NaN), for the plain topk."""
    keep = values >= floor
    rows, at = keep.nonzero(as_tuple=True)  # row-major: each row's in gathered order
    counts = keep.sum(-1)
    if int(counts.min()) < k:
        return None
    if values.shape[0] == 1:
        kept, kept_columns = values[0, at].unsqueeze(0), columns[0, at].unsqueeze(0)
    else:  # padded with -inf, never among a row's first k: it has k values >= floor
        widest = int(counts.max())
        kept = left_aligned(rows, counts, widest, values[rows, at], NEG_INF)
        kept_columns = left_aligned(rows, counts, widest, columns[rows, at], 0)
    if kept.shape[1] > 4 * k:  # a row crowded with ties at the floor (many removed tokens): topk is cheaper
        top, order = torch.topk(kept, k, dim=-1)
    else:
        top, order = kept.sort(-1, descending=True)
        top, order = top[:, :k], order[:, :k]
    return top, kept_columns.gather(1, order)


def first_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` (the first of tied maxima), through chunk maxima on wide rows: one pass of ``amax`` and
    two small searches, 0.05 ms over 262,144 logits where ``argmax`` takes 0.22. A row with NaN or no finite
    maximum, and a sync-free step, take ``argmax`` itself.

    >>> first_argmax(torch.tensor([[1.0, 3.0, 3.0, 2.0]]))
    tensor([1])
    """
    batch, width = x.shape
    if sync_free() or width % CHUNK or width // CHUNK < FAST_TOPK_MIN_CHUNKS:
        return x.argmax(-1)
    chunks = x.view(batch, width // CHUNK, CHUNK)
    maxima = chunks.amax(-1)  # [batch, chunks]
    top = maxima.amax(-1, keepdim=True)
    if not bool(torch.isfinite(top).all()):
        return x.argmax(-1)
    first_chunk = (maxima == top).byte().argmax(-1)  # argmax of 0/1 is the first 1
    within = chunks[torch.arange(batch, device=x.device), first_chunk]  # [batch, CHUNK]
    return first_chunk * CHUNK + (within == top).byte().argmax(-1)


def keep_from(c: Candidates, threshold: torch.Tensor) -> Candidates:
    """Keep the tokens whose logit is ``>= threshold`` (``[batch, 1]``); remove the rest.

    A wide row whose survivors are few (``COMPACT_LIMIT``) is compacted: one pass counts them, and a ``topk`` of
    exactly that size gathers them (ties at the threshold included, since the count is of ``>=``).
    """
    logits = c.logits
    width = logits.shape[-1]
    if width > SMALL_ROW and not sync_free():
        needed = int(count_at_least(logits, threshold).max())
        if needed <= COMPACT_LIMIT:
            values, columns = fast_topk(logits, max(needed, 1))
            return c.take(columns, values.masked_fill(values < threshold, NEG_INF), descending=True)
    return c.with_logits(remove_below(logits, threshold), descending=c.descending)


def remove_below(logits: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``logits`` with every value below ``threshold`` (``[batch, 1]``) set to −inf.

    On the CPU ``F.threshold`` (keeps x > t) with t the float just below the threshold is ~30× faster than
    ``masked_fill`` with a boolean mask over a 262,144-wide row (0.03 vs 1 ms here); it needs t on the host, so a
    sync-free step keeps the mask.
    """
    if sync_free() or logits.dtype != torch.float32 or logits.shape[-1] <= SMALL_ROW:  # a narrow row: the mask
        return logits.masked_fill(logits < threshold, NEG_INF)
    below = torch.nextafter(threshold, torch.full_like(threshold, NEG_INF)).flatten().tolist()
    rows = [torch.nn.functional.threshold(logits[i : i + 1], t, NEG_INF) for i, t in enumerate(below)]
    return rows[0] if len(rows) == 1 else torch.cat(rows)


# ---- penalties -------------------------------------------------------------------------------------------------


FLOAT32_MAX = torch.finfo(torch.float32).max


def _repetition(values: torch.Tensor, r: float) -> torch.Tensor:
    """ℓ>0 → ℓ/r, else ℓ·r; a finite logit stays finite (a penalty below 1 could overflow a huge one)."""
    out = torch.where(values > 0, values / r, values * r)
    return torch.where(torch.isfinite(values), out.clamp(-FLOAT32_MAX, FLOAT32_MAX), out)


def penalties(
    c: Candidates,
    history: History,
    repetition_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    last_n: int = -1,
    prompt_ignore_length: int = 0,
) -> Candidates:
    """Repetition penalty (CTRL), then frequency and presence penalties (OpenAI). Neutral: 1.0, 0.0, 0.0.

    Repetition sees the history (prompt + generated, less the first ``prompt_ignore_length`` prompt tokens):
    ℓ>0 → ℓ/r, else ℓ·r, once per distinct token. Frequency and presence count only generated tokens:
    ℓ_j −= c_j·α + [c_j>0]·β. ``last_n`` (llama.cpp's ``penalty_last_n``) limits all three to the last N tokens
    of the sequence (-1 = all of it, 0 = none).

    >>> c = Candidates.from_logits(torch.tensor([[2.0, -1.0, 0.5]]))
    >>> penalties(c, History(torch.tensor([[0, 1]])), repetition_penalty=2.0).logits
    tensor([[ 1.0000, -2.0000,  0.5000]])
    >>> penalties(c, History(torch.tensor([[2, 0, 0]]), prompt_len=1), frequency_penalty=0.5).logits
    tensor([[ 1.0000, -1.0000,  0.5000]])
    """
    logits = c.logits
    vocab = c.vocab_size
    seen_ids = history.window(last_n, start=min(prompt_ignore_length, history.prompt_len))
    if repetition_penalty != 1.0 and seen_ids.shape[1] > 0:
        # With the engine's statistics of the row, they are derived for the penalised row (every change lowers a
        # logit), on the host: the few numbers the penalty changes are read back once.
        stats = history.stats(c) if (repetition_penalty > 1.0 and frequency_penalty == 0.0 == presence_penalty
                                     and seen_ids.numel() <= narrow.PENALTY_HOST_LIMIT and not sync_free()) else None
        ids = seen_ids.tolist() if stats is not None else None
        if ids is not None and max(max(row) for row in ids) < vocab:
            old = logits.gather(1, seen_ids).tolist()
            new = narrow.repetition(old, repetition_penalty)
            logits = logits.scatter(1, seen_ids, narrow.as_tensor(new, device=logits.device))
            lowered = stats.lowered(ids, old, new)
            history.derived = None if lowered is None else (logits, lowered)
        elif c.is_dense and (sync_free() or not bool((seen_ids < vocab).all())):
            # Touch only the history's columns: a spare column absorbs ids past the vocab.
            padded = torch.nn.functional.pad(logits, (0, 1))
            clamped = seen_ids.clamp(max=vocab)
            seen = _repetition(padded.gather(1, clamped), repetition_penalty)
            logits = padded.scatter(1, clamped, seen)[:, :vocab]
        elif c.is_dense:  # every id inside the row (the usual case): one copy, no padded row and its slice
            # A repeated id writes the same value each time: each is penalised once, from the row's own logit.
            logits = logits.scatter(1, seen_ids, _repetition(logits.gather(1, seen_ids), repetition_penalty))
        else:
            present = _table(seen_ids, vocab, counts=False).gather(1, c.ids)
            logits = torch.where(present, _repetition(logits, repetition_penalty), logits)
    generated = history.window(last_n, start=history.prompt_len)
    if (frequency_penalty != 0.0 or presence_penalty != 0.0) and generated.shape[1] > 0:
        counts = _table(generated, vocab, counts=True)
        if not c.is_dense:
            counts = counts.gather(1, c.ids)
        delta = counts * frequency_penalty + (counts > 0).to(counts.dtype) * presence_penalty
        # a finite logit stays finite (one near float32's limit could overflow), a removed one stays removed
        logits = torch.where(torch.isfinite(logits), (logits - delta).clamp_(-FLOAT32_MAX, FLOAT32_MAX), logits)
    return c.with_logits(logits)


def no_repeat_ngram(c: Candidates, history: History, size: int) -> Candidates:
    """Ban every token that would complete an n-gram already in the history (prompt + generated). Neutral: 0.

    If a row would lose every token, its best token is kept (the documented fallback).

    >>> c = Candidates.from_logits(torch.zeros(1, 4))
    >>> no_repeat_ngram(c, History(torch.tensor([[1, 2, 3, 1]])), size=2).logits
    tensor([[0., 0., -inf, 0.]])
    """
    ids = history.input_ids
    length = ids.shape[1]
    if size <= 0 or length < size:
        return c
    vocab = c.vocab_size
    # An n-gram can be completed only by a window whose first n-1 tokens equal the current suffix.
    suffix = ids[:, length + 1 - size :]  # [batch, n-1]
    windows = ids.unfold(1, size, 1)  # [batch, windows, n]
    matches = (windows[..., :-1] == suffix.unsqueeze(1)).all(-1)  # [batch, windows]
    banned_ids = torch.where(matches, windows[..., -1].clamp(max=vocab), vocab)  # spare column = nothing banned
    if c.is_dense:
        padded = torch.nn.functional.pad(c.logits, (0, 1))
        out = padded.scatter(1, banned_ids, NEG_INF)[:, :vocab]
    else:
        banned = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool, device=ids.device)
        banned.scatter_(1, banned_ids, True)
        out = c.logits.masked_fill(banned[:, :vocab].gather(1, c.ids), NEG_INF)
    # Fallback without a host sync: a row left with nothing gets its best token back.
    best = c.logits.argmax(-1, keepdim=True)
    emptied = torch.isneginf(out.amax(-1, keepdim=True))
    restored = torch.where(emptied, c.logits.gather(1, best), out.gather(1, best))
    return c.with_logits(out.scatter(1, best, restored))


# ---- truncation ------------------------------------------------------------------------------------------------


def top_k(c: Candidates, k: int, min_keep: int = 1, maxima: Optional[torch.Tensor] = None,
          listed: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> Candidates:
    """Keep the k highest logits (at least ``min_keep``); ties with the k-th are kept too. Neutral: 0.

    >>> top_k(Candidates.from_logits(torch.tensor([[1.0, 3.0, 2.0, 2.0]])), 2).logits
    tensor([[-inf, 3., 2., 2.]])

    What an engine computed with the row, when it did: ``maxima``, the row's chunk maxima (``fast_topk``);
    ``listed``, its highest logits and their columns, sorted (``History.listed``).
    """
    width = c.logits.shape[-1]
    if k <= 0:
        return c
    k = max(k, min_keep)
    if k >= width:
        return c
    if listed is not None and k + 1 <= listed[0].shape[1]:
        values, columns = listed[0][:, : k + 1], listed[1][:, : k + 1]
    else:
        values, columns = fast_topk(c.logits, k + 1, maxima)
    kth = values[:, k - 1 : k]
    if sync_free():
        return keep_from(c, kth)
    if width > SMALL_ROW and bool((values[:, k:] < kth).all()):  # no tie crosses the boundary: the window is it
        return c.take(columns[:, :k], values[:, :k], descending=True)
    return keep_from(c, kth)


def top_p(c: Candidates, p: float, min_keep: int = 1, log_total: Optional[torch.Tensor] = None,
          listed: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> Candidates:
    """Nucleus: keep token j iff the probability mass strictly above it is < p (the token that crosses p is
    kept; ties with it are kept). At least ``min_keep`` tokens always survive. Neutral: 1.0.

    Masses are float64 sums of float32 probabilities, compared as transformers compares them: the mass from a
    token down (total − mass above it) rounded to float32 against 1 − p rounded to float32. So a boundary that is
    exact on paper (0.4 + 0.3 at p = 0.7) is judged as llama.cpp and transformers judge it: reached.

    Seed 001's first context: 0.6/0.25/0.1/0.05 with p=0.85 keeps two tokens.

    >>> probs = torch.tensor([[0.6, 0.25, 0.1, 0.05]])
    >>> top_p(Candidates.from_logits(probs.log()), 0.85).logits.isfinite()
    tensor([[ True,  True, False, False]])
    """
    if p >= 1.0:
        return c
    logits = c.logits
    width = logits.shape[-1]
    # listed: the row's highest logits and columns, when an engine listed them (top_k's argument): a window the
    # list holds is read from it, without a pass over the row. (The windows' sizes stay the same with or without
    # it: the path a row takes, and so the order in which the draw walks its survivors, must not depend on it.)
    # log_total: the caller may know it (the raw row's, computed once per step). Else it is computed here within
    # float32 rounding: that scales every probability alike, by ≈1e-6, far inside the margin below, so only a cut
    # that float32 rounding decides anyway (as transformers' float32 sum does) could move.
    cut = struct.unpack("f", struct.pack("f", 1.0 - p))[0]  # 1 − p rounded to float32 (a number, not a tensor)
    # One sort of the whole row: fixed shapes, nothing read back (cheap on a GPU), and on a narrow row (a compacted
    # one) fewer operations than the windows below.
    if sync_free() or width <= SMALL_ROW:
        if (c.descending and c.ids is not None and logits.numel() <= narrow.HOST_LIMIT and not sync_free()
                and logits.device.type == "cpu"):
            found = _top_p_narrow(c, cut, min_keep, log_total)
            if found is not None:
                return found
        values = logits if c.descending else torch.sort(logits, dim=-1, descending=True)[0]
        if log_total is None:  # the sorted row's first value is its maximum
            top = values[:, :1]
            log_total = torch.exp(values - top).sum(-1, keepdim=True).log_().add_(top)
        probs = torch.exp(values - log_total).double()
        mass_above = probs.cumsum(-1) - probs
        total = probs.sum(-1, keepdim=True)
        kept = ((total - mass_above).float() > cut).sum(-1, keepdim=True).clamp(min=min(min_keep, width))
        return keep_from(c, values.gather(1, kept - 1))
    if log_total is None:
        log_total = quick_logsumexp(logits)
    # the first window, from the list, decided on the host (batch 1 to 8)
    if listed is not None and FIRST_WINDOW <= listed[0].shape[1] and logits.shape[0] * FIRST_WINDOW <= 2048:
        found = _top_p_listed(c, listed, log_total, cut, min_keep)
        if found is not None:
            return found
    total = None  # each row's mass, ≈ 1 within float32 rounding: summed only for a row whose cut lies that close
    window = FIRST_WINDOW
    histogram_tried = False
    while True:
        window = min(window, width)
        if listed is not None and window <= listed[0].shape[1]:
            values, columns = listed[0][:, :window], listed[1][:, :window]
        else:
            values, columns = fast_topk(logits, window)  # sorted, descending
        probs = torch.exp(values - log_total).double()
        mass_above = probs.cumsum(-1) - probs
        # transformers' rule at its precision: keep j iff fl32(mass from j down) > fl32(1 - p).
        low = ((1.0 - 1e-5 - mass_above).float() > cut).sum(-1, keepdim=True)
        high = ((1.0 + 1e-5 - mass_above).float() > cut).sum(-1, keepdim=True)
        kept = low
        unsure = low != high  # [batch, 1]: a row whose cut lies that close to a token's edge needs its total
        if bool(unsure.any()):
            if total is None:
                total = torch.full_like(log_total, math.nan, dtype=torch.float64)
            rows = (unsure & total.isnan()).flatten().nonzero().flatten()
            if rows.numel():  # only those rows: a full pass over each, summed in float64 (no float64 copy)
                wide = logits if rows.numel() == logits.shape[0] else logits[rows]
                total[rows] = torch.sub(wide, log_total[rows]).exp_().sum(-1, keepdim=True, dtype=torch.float64)
            exact = ((total - mass_above).float() > cut).sum(-1, keepdim=True)
            kept = torch.where(unsure, exact, low)
        kept = kept.clamp(min=min(min_keep, window))
        threshold = values.gather(1, kept - 1)
        if window == width:
            return keep_from(c, threshold)
        # The window is enough when every row's cut lies inside it with room for the ties after it: then the
        # survivors are the window's first columns, taken as they are (no second pass to count and find them).
        if bool((values[:, -1:] < threshold).all()):
            keep = int((values >= threshold).sum(-1).max())
            kept_values = values[:, :keep]
            return c.take(columns[:, :keep], kept_values.masked_fill(kept_values < threshold, NEG_INF),
                          descending=True)
        # Every token past the window is at most as probable as its last one, so the mass still missing bounds
        # the nucleus from below: the windows it cannot fit in are skipped, and a row that needs more than
        # HISTOGRAM_AFTER_WINDOW goes to the histogram at once (a flat row: a large nucleus).
        missing = (1.0 - p) - probs.sum(-1)
        at_least = float((window + missing / probs[:, -1]).nan_to_num(nan=0.0).max())
        if width >= HISTOGRAM_MIN_WIDTH and not histogram_tried and (
                window >= HISTOGRAM_AFTER_WINDOW or at_least > HISTOGRAM_AFTER_WINDOW):
            histogram_tried = True
            threshold = _top_p_threshold_from_histogram(logits, log_total, cut, min_keep)
            if threshold is not None:
                return keep_from(c, threshold)
        window *= WINDOW_GROWTH
        while window < min(at_least, width):
            window *= WINDOW_GROWTH


def _top_p_narrow(c: Candidates, cut: float, min_keep: int, log_total: Optional[torch.Tensor]) -> Optional[Candidates]:
    """top_p on a compacted row in descending order, decided on the host (``narrow.top_p_sorted_count``): the
    survivors as a prefix of the row, or None (the tensor path)."""
    rows = c.logits.tolist()
    counts = narrow.top_p_sorted_count(rows, cut, None if log_total is None else log_total.flatten().tolist())
    if counts is None:
        return None
    thresholds = _nucleus_thresholds(rows, counts, min_keep)
    return _prefix(c, [narrow.reaching(row, x) for row, x in zip(rows, thresholds)], thresholds)


def _nucleus_thresholds(rows: list[list[float]], counts: list[int], min_keep: int) -> list[float]:
    """Each row's last kept logit: its ``count``-th highest, or its ``min_keep``-th when that is lower."""
    return [row[max(count, min(min_keep, len(row))) - 1] for row, count in zip(rows, counts)]


def _prefix(c: Candidates, keep: list[int], thresholds: list[float], values: Optional[torch.Tensor] = None,
            columns: Optional[torch.Tensor] = None) -> Candidates:
    """The first ``keep[row]`` columns of each row of ``c`` (sorted, highest first: ``values`` and ``columns``
    when they are a list's, not ``c``'s own), a longer row's beyond its own count removed (below its threshold)."""
    widest = max(keep)
    if values is None:
        kept = Candidates(c.logits[:, :widest], c.ids[:, :widest], c.vocab_size, descending=True)
    else:
        kept = c.take(columns[:, :widest], values[:, :widest], descending=True)
    if min(keep) == widest:
        return kept
    cuts = narrow.as_tensor([[x] for x in thresholds], device=kept.logits.device)
    return kept.with_logits(kept.logits.masked_fill(kept.logits < cuts, NEG_INF), descending=True)


def _top_p_listed(c: Candidates, listed: tuple[torch.Tensor, torch.Tensor], log_total: torch.Tensor, cut: float,
                  min_keep: int) -> Optional[Candidates]:
    """top_p's first window from an engine's list of highest logits, decided on the host (``narrow.top_p_count``):
    the survivors when the window holds every row's, else None (the window the tensor way)."""
    window = FIRST_WINDOW
    values, columns = listed[0][:, :window], listed[1][:, :window]
    rows = values.tolist()
    counts = narrow.top_p_count(rows, log_total.flatten().tolist(), cut)
    if counts is None:
        return None
    thresholds = _nucleus_thresholds(rows, counts, min_keep)
    if any(row[-1] >= threshold for row, threshold in zip(rows, thresholds)):  # ties reach the window's end
        return None
    return _prefix(c, [narrow.reaching(row, x) for row, x in zip(rows, thresholds)], thresholds, values, columns)


def _top_p_threshold_from_histogram(logits: torch.Tensor, log_total: torch.Tensor, cut: float,
                                    min_keep: int) -> Optional[torch.Tensor]:
    """top_p's threshold (``[batch, 1]``, the logit of the last token kept) without sorting the row, or ``None``
    when the cut's neighbourhood is too crowded (then the caller sorts).

    The row's probabilities are summed (in float64, as top_p sums them) per bin of their float32 exponent and top
    7 mantissa bits: 128 bins per halving, a monotone map, so a higher bin holds only more probable tokens. A bin
    whose every token has ``fl32(total - mass above) > cut`` is wholly kept, one whose every token fails it wholly
    removed; the tokens of the bins between (one, usually, with a bin of margin on each side against rounding)
    are sorted, and their masses above are the higher bins' mass plus their own running sum: the comparison the
    sorted path makes, token by token.
    """
    batch = logits.shape[0]
    probs = torch.exp(logits - log_total)  # float32 as the sorted path computes them; 0 for a removed token
    bins = probs.view(torch.int32) >> HISTOGRAM_SHIFT  # ≥ 0, ≤ the bin of 1.0 (and of 1 + rounding)
    index = bins  # one bincount for the batch: row r's bins offset by r histograms
    if batch > 1:
        index = bins + torch.arange(batch, dtype=torch.int32, device=logits.device).unsqueeze(1) * HISTOGRAM_BINS
    mass = torch.bincount(index.flatten(), weights=probs.flatten().double(), minlength=batch * HISTOGRAM_BINS)
    mass = mass.view(batch, HISTOGRAM_BINS).flip(-1)  # most probable bin first
    total = mass.sum(-1, keepdim=True)
    after = mass.cumsum(-1)
    before = after - mass
    wholly_kept = ((total - after).float() > cut).sum(-1, keepdim=True)  # a prefix of the bins
    wholly_removed = ((total - before).float() <= cut).sum(-1, keepdim=True)  # a suffix
    first = (wholly_kept - 1).clamp_(min=0)
    last = (HISTOGRAM_BINS - wholly_removed).clamp_(max=HISTOGRAM_BINS - 1)
    # The bins first..last as a range of probabilities; every other token 0 (F.threshold: no boolean mask).
    rows = []
    for row, low_bin, high_bin in zip(probs, last.flatten().tolist(), first.flatten().tolist()):
        if low_bin == ONE_BITS:  # the cut reaches the tokens of probability ≈ 0: a sort is as cheap
            return None
        low = _float_from_bits(((ONE_BITS - low_bin) << HISTOGRAM_SHIFT) - 1)  # just under the lowest bin
        above = _float_from_bits((ONE_BITS - high_bin + 1) << HISTOGRAM_SHIFT)  # just over the highest bin
        negated = torch.nn.functional.threshold(row, low, 0.0).neg_()  # -p where p > low
        rows.append(torch.nn.functional.threshold(negated, -above, 0.0).neg_())  # and p < above
    near = torch.stack(rows) if batch > 1 else rows[0].unsqueeze(0)
    count = int(torch.count_nonzero(near, dim=-1).max())
    if count > HISTOGRAM_SORT_LIMIT or count == 0:
        return None
    picked, columns = fast_topk(near, count)
    # Sorted by logit (equal probabilities may hide unequal logits); a row with fewer tokens near its cut pads
    # with tokens outside, which are left out.
    values = torch.where(picked > 0, logits.gather(1, columns), NEG_INF).sort(-1, descending=True).values
    near_probs = torch.exp(values - log_total).double()
    mass_above = before.gather(1, first) + near_probs.cumsum(-1) - near_probs
    kept = (((total - mass_above).float() > cut) & (values > NEG_INF)).sum(-1, keepdim=True)
    if min_keep > 1:
        kept_above = (bins > ONE_BITS - first).sum(-1, keepdim=True)
        if bool((kept_above + kept < min_keep).any()):
            return None
    if bool((kept == 0).any()):  # the cut lies above the sorted bins (empty margin bins): let the caller sort
        return None
    return values.gather(1, kept - 1)


def _float_from_bits(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def min_p(c: Candidates, m: float, min_keep: int = 1) -> Candidates:
    """Keep tokens with p_i ≥ m·p_max, i.e. ℓ_i ≥ ℓ_max + ln m. Neutral: 0.0.

    >>> min_p(Candidates.from_logits(torch.tensor([[0.5, 0.3, 0.2]]).log()), 0.5).dense().isfinite()
    tensor([[ True,  True, False]])
    """
    if m <= 0.0:
        return c
    threshold = c.logits.amax(-1, keepdim=True) + math.log(m)
    return keep_from(c, protect(c, threshold, min_keep) if min_keep > 1 else threshold)


def typical_p(c: Candidates, mass: float, min_keep: int = 1) -> Candidates:
    """Locally typical sampling (Meister et al.; transformers' TypicalLogitsWarper). Neutral: 1.0.

    Tokens are ranked by how far their surprisal is from the entropy; the smallest set of the most typical
    tokens whose mass reaches ``mass`` is kept (ties with the last one kept too).

    >>> typical_p(Candidates.from_logits(torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()), 0.5).dense().isfinite()
    tensor([[False,  True,  True, False]])
    """
    if mass >= 1.0:
        return c
    if not c.is_dense and c.logits.shape[-1] > SMALL_ROW:
        # Many survivors: sum over the full row, in transformers' order. On a flat distribution, distances that
        # tie within float32 rounding would otherwise fall on either side of the cut.
        c = Candidates(c.dense(), None, c.vocab_size)
    logits = c.logits
    log_probs = torch.log_softmax(logits, dim=-1)
    entropy = -(log_probs * log_probs.exp()).nansum(-1, keepdim=True)
    distance = (-log_probs - entropy).abs()
    sorted_distance, order = torch.sort(distance, dim=-1)
    cumulative = logits.gather(1, order).softmax(-1).cumsum(-1)
    last = (cumulative < mass).sum(-1, keepdim=True).clamp(max=logits.shape[-1] - 1)
    removed_sorted = sorted_distance > sorted_distance.gather(1, last)
    removed_sorted[:, : max(1, min_keep)] = False
    # Kept tokens are a prefix of the distance order: compact to the longest prefix in the batch.
    kept = (~removed_sorted).sum(-1, keepdim=True)
    width = int(kept.max())
    columns = order[:, :width]
    position = torch.arange(width, device=logits.device).unsqueeze(0)
    values = logits.gather(1, columns).masked_fill(position >= kept, NEG_INF)
    return c.take(columns, values)


# ---- shape -----------------------------------------------------------------------------------------------------


def temperature(c: Candidates, t: float, row_max: Optional[torch.Tensor] = None) -> Candidates:
    """ℓ / T. T = 0 keeps only the top token (the first one on a tie). Neutral: 1.0.

    >>> temperature(Candidates.from_logits(torch.tensor([[1.0, 2.0]])), 0.5).logits
    tensor([[2., 4.]])
    """
    if t == 1.0:
        return c
    if t == 0.0:
        return c.take(c.logits.argmax(-1, keepdim=True))
    # ℓ/T overflows only for absurd logits (|ℓ| near float32's limit at small T); only there is the row shifted
    # by its maximum first, which leaves its softmax unchanged. Everywhere else the values are exactly ℓ/T.
    if row_max is None:  # the caller may know it (the raw row's, from the finiteness check)
        row_max = c.logits[:, :1] if c.descending else c.logits.amax(-1, keepdim=True)
    # Read on the host, with room: a finite ℓ/T overflows float32 only past half its largest value times T. Then
    # one pass; dividing by T > 0 keeps the order. A row flagged here (or any, sync-free) is judged exactly below,
    # and an unflagged one there gets the same values (ℓ − 0 is ℓ).
    if not sync_free() and not any(math.isfinite(top) and abs(top) >= FLOAT32_MAX * 0.5 * t
                                   for top in row_max.flatten().tolist()):
        return c.with_logits(torch.div(c.logits, t), descending=c.descending)
    overflows = torch.isinf(row_max / t) & torch.isfinite(row_max)
    shift = torch.where(overflows, row_max, torch.zeros_like(row_max))
    return c.with_logits(torch.sub(c.logits, shift).div_(t), descending=c.descending)  # divided in place


def dynamic_temperature(c: Candidates, t: float, spread: float, exponent: float = 1.0) -> Candidates:
    """llama.cpp's dynamic temperature: per row, T' = max(0, T−spread) + 2·spread·(H/ln n)^exponent.

    H is the entropy of the row's survivors and n their number, so a confident row is cooled and a flat one
    warmed. A row with one survivor is left as it is; a row whose T' is 0 keeps only its top token.

    >>> row = Candidates.from_logits(torch.tensor([[0.0, 0.0]]))  # flat: H/ln n = 1, so T' = T + spread
    >>> dynamic_temperature(row, 1.0, 0.5).logits
    tensor([[0., 0.]])
    """
    logits = c.logits
    if logits.shape[-1] > SMALL_ROW:  # one softmax, and no boolean pass over a row with nothing removed
        whole = not sync_free() and row_finite(logits)
        entropy = wide_entropy(logits, finite=whole)[0]
        count = torch.full_like(entropy, logits.shape[-1]) if whole else torch.isfinite(logits).sum(-1, keepdim=True)
    else:
        count = torch.isfinite(logits).sum(-1, keepdim=True)
        log_probs = torch.log_softmax(logits, dim=-1)
        entropy = -(log_probs.exp() * log_probs).nansum(-1, keepdim=True)
    normalised = entropy / torch.log(count.clamp(min=2).to(logits.dtype))
    low, high = max(0.0, t - spread), t + spread
    temp = low + (high - low) * normalised.clamp(min=0.0).pow(exponent)
    single = count <= 1
    cold = (temp <= 0.0) & ~single
    scaled = logits / torch.where(single | cold, torch.ones_like(temp), temp)  # single, cold rows: unchanged
    if not sync_free() and not bool(cold.any()):  # the usual case: no row keeps only its top token
        return c.with_logits(scaled)
    top_only = logits.masked_fill(logits < logits.amax(-1, keepdim=True), NEG_INF)
    return c.with_logits(torch.where(cold, top_only, scaled))


# ---- builders: the registry names these (``impl``); each takes the config and returns the stage -------------------


def penalties_stage(cfg: Any) -> Stage:
    return lambda c, h: penalties(c, h, cfg.repetition_penalty, cfg.frequency_penalty, cfg.presence_penalty,
                                  cfg.penalty_last_n, cfg.prompt_ignore_length)


def no_repeat_ngram_stage(cfg: Any) -> Stage:
    return lambda c, h: no_repeat_ngram(c, h, cfg.no_repeat_ngram_size)


def top_k_stage(cfg: Any) -> Stage:
    return lambda c, h: top_k(c, cfg.top_k, cfg.min_tokens_to_keep, h.chunk_maxima(c), h.listed(c))


def top_p_stage(cfg: Any) -> Stage:
    return lambda c, h: top_p(c, cfg.top_p, cfg.min_tokens_to_keep, h.log_total(c), h.listed(c))


def min_p_stage(cfg: Any) -> Stage:
    return lambda c, h: min_p(c, cfg.min_p, cfg.min_tokens_to_keep)


def typical_p_stage(cfg: Any) -> Stage:
    return lambda c, h: typical_p(c, cfg.typical_p, cfg.min_tokens_to_keep)


def temperature_stage(cfg: Any) -> Stage:
    if cfg.dynatemp_range > 0.0:
        return lambda c, h: dynamic_temperature(c, cfg.temperature, cfg.dynatemp_range, cfg.dynatemp_exponent)
    if cfg.temperature in (0.0, 1.0):
        return lambda c, h: temperature(c, cfg.temperature)
    return lambda c, h: temperature(c, cfg.temperature, h.row_max(c))


def check_logits(logits: torch.Tensor) -> None:
    """Raise ``SamplingError`` for a row with NaN, +inf, or no finite value.

    One ``amax`` per row finds all three (it propagates NaN); the slow diagnosis runs only on failure.
    """
    from llmsample.errors import SamplingError

    row_max = logits.amax(-1)
    if bool(torch.isfinite(row_max).all()):
        return
    diagnose_logits(logits)


def diagnose_logits(logits: torch.Tensor) -> None:
    """Raise the ``SamplingError`` that names what is wrong with a row: NaN, +inf, or no finite value."""
    from llmsample.errors import SamplingError

    row_max = logits.amax(-1)
    nan_rows = torch.isnan(logits).any(-1).nonzero().flatten().tolist()
    if nan_rows:
        raise SamplingError(f"the model's logits contain NaN (batch row {_rows(nan_rows)})")
    pos_inf = torch.isposinf(logits).any(-1).nonzero().flatten().tolist()
    if pos_inf:
        raise SamplingError(f"the model's logits contain +inf (batch row {_rows(pos_inf)})")
    empty = torch.isneginf(row_max).nonzero().flatten().tolist()
    raise SamplingError(f"every logit is -inf: no token can be chosen (batch row {_rows(empty)})")


def _rows(rows: list[int], limit: int = 5) -> str:
    shown = ", ".join(str(r) for r in rows[:limit])
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


"""Decisions made on the host (``sampling.narrow``) against the tensor paths they stand in for: the same token for
the same uniform number, the same kept set, the same float32 numbers; and no decision where rounding could tip it."""

from __future__ import annotations

import math

import pytest
import torch

from llmsample.config import SamplingConfig
from llmsample.sampling import Sampler, narrow, stages
from llmsample.sampling.candidates import Candidates
from llmsample.sampling.row_stats import RowStats
from llmsample.sampling.sampler import draw, uniforms

NEG_INF = float("-inf")


def narrow_rows(trial: int) -> torch.Tensor:
    """A batch of narrow rows of one kind: plain, tied, with removed tokens, peaked, nearly flat, huge logits."""
    g = torch.Generator().manual_seed(trial)
    batch, width = 1 + trial % 3, 1 + (37 * trial) % 700
    logits = torch.randn(batch, width, generator=g) * (0.3 + 5 * torch.rand(1, generator=g).item())
    kind = trial % 6
    if kind == 1:
        logits = logits.round()  # ties
    elif kind == 2 and width > 1:
        logits[torch.rand(batch, width, generator=g) < 0.3] = NEG_INF
        logits[:, 0] = 0.0  # each row keeps a token
    elif kind == 3:
        logits[:, :3] += 25  # nearly all the mass in three tokens, the rest ≈ 1e-11 each
    elif kind == 4:
        logits = logits * 1e-6  # nearly uniform
    elif kind == 5:
        logits = logits * 1e4  # probabilities that underflow float32 beside 1
    return logits


@pytest.mark.parametrize("trial", range(60))
def test_the_host_draw_picks_the_tensor_draws_token_for_the_same_uniform_number(trial):
    logits = narrow_rows(trial)
    decided = 0
    for seed in range(25):
        u = uniforms(logits, torch.Generator().manual_seed(seed))
        picked = narrow.draw(logits.tolist(), u.flatten().tolist())
        if picked is None:
            continue
        decided += 1
        probs = torch.softmax(logits, -1)
        assert [column for column, _, _ in picked] == draw(logits, probs=probs, u=u).tolist()
        expected = probs.gather(1, torch.tensor([[c] for c, _, _ in picked])).flatten().double()
        assert torch.allclose(torch.tensor([p for _, p, _ in picked], dtype=torch.float64), expected, rtol=1e-5)
        entropy = torch.special.entr(probs.double()).sum(-1)
        assert torch.allclose(torch.tensor([h for _, _, h in picked], dtype=torch.float64), entropy, atol=1e-5)
    assert decided >= 20  # the margin sends only draws near an interval's edge to the tensor path


def test_a_uniform_number_on_an_intervals_edge_is_left_to_the_tensor_draw():
    logits = torch.tensor([[0.25, 0.25, 0.5]]).log()
    assert narrow.draw(logits.tolist(), [0.5]) is None  # the cumulative probability after two tokens is 0.5
    assert narrow.draw(logits.tolist(), [0.5 - 1e-7]) is None  # within float32 rounding of it
    assert narrow.draw(logits.tolist(), [0.4]) is not None
    assert narrow.draw([[NEG_INF, NEG_INF]], [0.3]) is None  # an emptied row: the tensor path reports it


def listed_row(trial: int) -> tuple[torch.Tensor, RowStats, float]:
    g = torch.Generator().manual_seed(500 + trial)
    logits = torch.randn(1 + trial % 3, 30_000, generator=g) * (1 + trial % 4)
    logits[:, : 5 + trial] += 4 + trial % 5
    if trial % 4 == 1:
        logits = (logits * 2).round() / 2  # ties, across the cut too
    p = 0.3 + 0.69 * torch.rand(1, generator=g).item()
    return logits, RowStats.of(logits), p


@pytest.mark.parametrize("trial", range(40))
def test_top_p_from_the_list_decided_on_the_host_keeps_what_the_tensor_window_keeps(trial, monkeypatch):
    logits, stats, p = listed_row(trial)
    listed = (stats.top_values, stats.top_columns)
    host = stages.top_p(Candidates.from_logits(logits), p, log_total=stats.log_total, listed=listed)
    monkeypatch.setattr(narrow, "top_p_count", lambda *args: None)
    tensor = stages.top_p(Candidates.from_logits(logits), p, log_total=stats.log_total, listed=listed)
    assert torch.equal(host.dense(), tensor.dense())
    assert torch.equal(host.token_ids(), tensor.token_ids())  # the same order: a seed draws the same token


@pytest.mark.parametrize("trial", range(40))
def test_top_p_on_a_compacted_row_decided_on_the_host_keeps_what_the_sorted_path_keeps(trial, monkeypatch):
    logits, _, p = listed_row(trial)
    compacted = stages.top_k(Candidates.from_logits(logits), 5 + 6 * trial)  # descending, with ids
    host = stages.top_p(compacted, p)
    monkeypatch.setattr(narrow, "top_p_sorted_count", lambda *args: None)
    tensor = stages.top_p(compacted, p)
    assert torch.equal(host.dense(), tensor.dense())
    survivors = tensor.logits.isfinite()
    assert torch.equal(host.token_ids()[host.logits.isfinite()], tensor.token_ids()[survivors])


def test_the_host_decides_top_p_on_most_of_these_rows():
    """(So the two tests above compare the host with the tensor path, not the tensor path with itself.)"""
    from_list = from_row = 0
    for trial in range(40):
        logits, stats, p = listed_row(trial)
        cut = float(torch.tensor(1 - p, dtype=torch.float32))
        window = stats.top_values[:, : stages.FIRST_WINDOW].tolist()
        from_list += narrow.top_p_count(window, stats.log_total.flatten().tolist(), cut) is not None
        compacted = stages.top_k(Candidates.from_logits(logits), 5 + 6 * trial)
        if compacted.logits.numel() <= narrow.HOST_LIMIT:
            from_row += narrow.top_p_sorted_count(compacted.logits.tolist(), cut) is not None
    assert from_list >= 15 and from_row >= 20


def test_a_cut_on_a_tokens_edge_is_left_to_the_tensor_path():
    """Masses that sum exactly to the cut: top_p's own band (1e-5) decides them, so the host does not."""
    values = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    cut = float(torch.tensor(1 - 0.7, dtype=torch.float32))
    assert narrow.top_p_sorted_count(values.tolist(), cut) is None
    assert narrow.top_p_count(values.tolist(), [0.0], cut) is None
    assert narrow.top_p_sorted_count(values.tolist(), float(torch.tensor(0.45, dtype=torch.float32))) == [2]


def test_the_host_repetition_penalty_is_torchs_float32_arithmetic():
    g = torch.Generator().manual_seed(3)
    values = torch.randn(4, 5_000, generator=g) * torch.exp(torch.randn(4, 5_000, generator=g) * 4)
    values[0, :8] = torch.tensor([0.0, -0.0, NEG_INF, math.inf, 3.0e38, -3.0e38, 1e-45, -1e-45])
    for penalty in (1.3, 1.1, 0.7, 2.0, 1.0001):
        host = narrow.as_tensor(narrow.repetition(values.tolist(), penalty))
        assert torch.equal(host, stages._repetition(values, penalty)), penalty
        assert torch.equal(host.signbit(), stages._repetition(values, penalty).signbit())


def test_as_tensor_keeps_rows_and_types():
    assert narrow.as_tensor([[1, 2], [3, 4]], torch.long).tolist() == [[1, 2], [3, 4]]
    assert narrow.as_tensor([[0.1]]).dtype == torch.float32
    assert narrow.as_tensor([[], []]).shape == (2, 0)


@pytest.mark.parametrize("settings", [
    {"top_k": 64, "top_p": 0.95}, {"temperature": 0.7, "top_p": 0.9},
    {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.3}, {"temperature": 0.7, "top_k": 50, "top_p": 0.9},
    {"temperature": 0.7, "epsilon_cutoff": 3e-4}, {"top_k": 40, "min_p": 0.05},
])
def test_a_step_decided_on_the_host_equals_the_tensor_step(settings, monkeypatch):
    """The same tokens for the same seeds, the probabilities and entropy within float32 rounding; with and without
    an engine's statistics."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 1000, (2, 40), generator=g)
    cfg = SamplingConfig(do_sample=True, **settings)
    rows = []
    for trial in range(6):
        logits = torch.randn(2, 100_000, generator=g) * (1 + trial % 3)
        logits[:, : 8 + 12 * trial] += 14 - trial  # nuclei of a few to hundreds of tokens
        rows.append(logits)
    results = {}
    decided = []
    host_draw = narrow.draw
    monkeypatch.setattr(narrow, "draw", lambda *args: decided.append(host_draw(*args)) or decided[-1])
    for mode in ("host", "tensor"):
        if mode == "tensor":
            monkeypatch.setattr(narrow, "HOST_LIMIT", 0)
            monkeypatch.setattr(narrow, "top_p_count", lambda *args: None)
            monkeypatch.setattr(stages, "_top_p_narrow", lambda *args: None)
        results[mode] = [Sampler(cfg).step(ids, logits, torch.Generator().manual_seed(seed), stats=stats)
                         for logits in rows for stats in (None, RowStats.of(logits)) for seed in range(4)]
    assert sum(picked is not None for picked in decided) >= len(results["host"]) // 4  # the rest: wide nuclei
    for host, tensor in zip(results["host"], results["tensor"]):
        assert torch.equal(host.token_ids, tensor.token_ids)
        for field in ("prob", "raw_prob", "entropy"):
            assert torch.allclose(getattr(host, field), getattr(tensor, field), rtol=1e-5, atol=1e-6), field

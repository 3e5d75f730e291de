"""The stages beyond the seeds: each against a direct re-statement of its peer's rule, plus the choices DESIGN.md
pins where the peers leave room."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmsample.config import SamplingConfig
from llmsample.errors import ConfigError
from llmsample.sampling import Sampler
from llmsample.sampling.biases import bad_words, logit_bias, sequence_bias
from llmsample.sampling.candidates import Candidates
from llmsample.sampling.dry import dry
from llmsample.sampling.mirostat import Mirostat
from llmsample.sampling.stages import History, dynamic_temperature, penalties
from llmsample.sampling.truncation import top_n_sigma, xtc

# ---- DRY against a plain statement of llama.cpp's algorithm ---------------------------------------------------


def dry_reference(history, vocab, multiplier, base, allowed, last_n, breakers):
    """llama.cpp's DRY written the slow, obvious way: returns {token: penalty}."""
    window = history if last_n < 0 else history[max(0, len(history) - last_n):] if last_n > 0 else []
    n = len(window)
    if multiplier == 0 or base < 1 or last_n == 0 or n <= allowed:
        return {}
    # Step 1: the latest breaker start; the longest breaker starting there.
    limit = n
    for i in range(n):  # i tokens from the end
        head = n - 1 - i
        best = -1
        for seq in breakers:
            tail = len(seq) - 1
            if window[head] == seq[0] and tail <= i and tuple(window[head:head + len(seq)]) == tuple(seq):
                best = max(best, tail)
        if best >= 0:
            limit = i - best
            break
    if limit < allowed:
        return {}
    longest = {}
    for k in range(1, n):  # shift: the place ending at n-1-k
        m = 0
        while m + k < n and window[n - 1 - m] == window[n - 1 - m - k]:
            m += 1
        m = min(m, limit)
        if m >= allowed:
            token = window[n - k]
            longest[token] = max(longest.get(token, 0), m)
    singles = {seq[0] for seq in breakers if len(seq) == 1}
    cap = int(88.7228391 / math.log(base)) if base > 1.000001 else 0
    out = {}
    for token, m in longest.items():
        if token in singles or token >= vocab:
            continue
        exponent = m - allowed
        if cap > 0 and exponent > cap:
            exponent = cap
        out[token] = float(torch.tensor(multiplier, dtype=torch.float32) * torch.tensor(base, dtype=torch.float32) ** exponent)
    return out


@settings(max_examples=300, deadline=None)
@given(
    history=st.lists(st.integers(0, 4), min_size=0, max_size=40),
    allowed=st.integers(1, 4),
    last_n=st.sampled_from([-1, 0, 5, 12, 100]),
    base=st.sampled_from([1.0, 1.1, 1.75, 3.0]),
    breakers=st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=3).map(tuple), max_size=3),
)
def test_dry_equals_llama_cpp_rule(history, allowed, last_n, base, breakers):
    vocab = 6
    expected = dry_reference(history, vocab, 0.8, base, allowed, last_n, breakers)
    out = dry(Candidates.from_logits(torch.zeros(1, vocab)), History(torch.tensor([history], dtype=torch.long)),
              0.8, base, allowed, last_n, tuple(breakers))
    got = {t: -float(out.logits[0, t]) for t in range(vocab) if out.logits[0, t] != 0}
    assert got.keys() == expected.keys()
    for token, penalty in expected.items():
        assert got[token] == pytest.approx(penalty, rel=1e-6)


def test_dry_overflowing_penalty_removes_the_token():
    history = torch.tensor([[1, 2] * 200 + [1]])  # a 399-token repeat: the exponent hits its cap
    out = dry(Candidates.from_logits(torch.zeros(1, 4)), History(history), 50.0, 1.75, 2, -1, ())
    assert out.logits[0, 2] == float("-inf") and out.logits[0, 0] == 0.0


def test_dry_looks_at_each_batch_row_and_compacted_candidates():
    history = History(torch.tensor([[1, 2, 3, 1, 2], [0, 0, 0, 0, 0]]))
    dense = dry(Candidates.from_logits(torch.zeros(2, 5)), history, 1.0, 2.0, 2, -1, ())
    assert dense.logits[0].tolist() == [0, 0, 0, -1.0, 0]
    assert dense.logits[1, 0] == -(2.0 ** 2)  # "0 0 0 0" repeats 4 long: 2^(4-2)
    columns = torch.tensor([[3, 4], [0, 1]])
    compact = dry(Candidates(torch.zeros(2, 2), columns, 5), history, 1.0, 2.0, 2, -1, ())
    assert torch.equal(compact.logits, dense.logits.gather(1, columns))


# ---- top-n-sigma, XTC, dynamic temperature, mirostat ----------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=2, max_size=60), st.floats(0.1, 3.0))
def test_top_n_sigma_keeps_logits_within_n_sigma_of_the_max(values, n):
    logits = torch.tensor([values])
    out = top_n_sigma(Candidates.from_logits(logits), n).dense()
    exact = logits.double()
    threshold = exact.max() - n * exact.std(correction=0)
    near = (exact - threshold).abs() < 1e-5  # float32 rounding of σ decides these
    assert torch.equal(torch.isfinite(out) & ~near, (exact >= threshold) & ~near)


def test_top_n_sigma_ignores_removed_tokens_in_sigma():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, float("-inf")]])
    assert torch.equal(top_n_sigma(Candidates.from_logits(logits), 1.0).dense().isfinite(),
                       torch.tensor([[False, False, True, True, False]]))


def test_xtc_draws_from_the_run_generator_and_records_it():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(64, -1)
    history = History(torch.zeros(64, 1, dtype=torch.long), generator=torch.Generator().manual_seed(3))
    out = xtc(Candidates.from_logits(logits), history, 0.5, 0.1)
    fired = history.record["xtc"]
    assert 10 < int(fired.sum()) < 54  # about half
    removed = ~torch.isfinite(out.dense())
    assert torch.equal(removed[:, :2], fired.unsqueeze(-1).expand(-1, 2)) and not removed[:, 2:].any()
    again = History(history.input_ids, generator=torch.Generator().manual_seed(3))
    xtc(Candidates.from_logits(logits), again, 0.5, 0.1)
    assert torch.equal(again.record["xtc"], fired)


def test_xtc_respects_min_keep_and_the_threshold_limit():
    logits = torch.tensor([[0.5, 0.45, 0.05]]).log()
    fire = History(torch.zeros(1, 1, dtype=torch.long), replay={"xtc": torch.tensor([True])})
    assert xtc(Candidates.from_logits(logits), fire, 1.0, 0.4, min_keep=3).dense().isfinite().all()
    assert xtc(Candidates.from_logits(logits), fire, 1.0, 0.4, min_keep=2).dense().isfinite().sum() == 2
    cfg = SamplingConfig(do_sample=True, xtc_probability=1.0, xtc_threshold=0.6)
    assert Sampler(cfg).stage_names == ()  # a threshold above 0.5 never acts: not in the chain


def test_xtc_at_threshold_zero_keeps_the_least_likely_token_still_in_the_running():
    """A removed token (−inf, p = 0) is not a candidate even at threshold 0: the row keeps its least likely live
    token, as llama.cpp's list (which holds only live tokens) does; it is never emptied."""
    logits = torch.tensor([[float("-inf"), 2.0, 1.0, float("-inf"), 0.5, 3.0]])
    fire = History(torch.zeros(1, 1, dtype=torch.long), replay={"xtc": torch.tensor([True])})
    out = xtc(Candidates.from_logits(logits), fire, 1.0, 0.0).dense()
    assert torch.equal(out.isfinite(), torch.tensor([[False, False, False, False, True, False]]))


@pytest.mark.parametrize("settings", [
    dict(top_k=3, top_p=0.5, min_p=0.1, temperature=0.5), dict(xtc_probability=1.0, xtc_threshold=0.0),
    dict(epsilon_cutoff=0.2, eta_cutoff=0.2, typical_p=0.3, top_n_sigma=0.1),
])
def test_a_chain_of_truncations_never_empties_a_usable_row(settings):
    """What lets the sampler skip its "was a row emptied" pass for such chains (``StageSpec.keeps_a_token``)."""
    from llmsample.sampling import registry

    cfg = SamplingConfig(do_sample=True, **settings)
    sampler = Sampler(cfg)
    assert all(registry.STAGES[name].keeps_a_token for name in sampler.stage_names)
    g = torch.Generator().manual_seed(4)
    for _ in range(20):
        logits = torch.randn(3, 50, generator=g) * 5
        logits[torch.rand(3, 50, generator=g) < 0.5] = float("-inf")
        logits[:, 0] = torch.randn(3, generator=g)  # every row keeps a live token
        history = History(torch.zeros(3, 1, dtype=torch.long), generator=g)
        c = Candidates.from_logits(logits)
        for name, stage in zip(sampler.stage_names, sampler._stages):
            c = stage(c, history)
        assert bool(c.dense().isfinite().any(-1).all())


def test_a_trace_after_a_step_shows_that_steps_xtc_decision():
    cfg = SamplingConfig(do_sample=True, xtc_probability=0.5, xtc_threshold=0.1)
    sampler = Sampler(cfg)
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(32, -1).contiguous()
    ids = torch.zeros(32, 1, dtype=torch.long)
    choice = sampler.step(ids, logits, generator=torch.Generator().manual_seed(0))
    trace = sampler.trace(ids, logits, top_n=4)
    fired = choice.record["xtc"]
    for row in range(32):
        cut = trace.removed_by[row][0] == "xtc"
        assert cut == bool(fired[row])


def test_dynamic_temperature_follows_llama_cpp_formula():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    probs = logits.softmax(-1)
    entropy = -(probs * probs.log()).sum()
    t = 0.5 + 1.0 * (entropy / math.log(4)) ** 1.5  # T=1, range 0.5: from 0.5 to 1.5
    out = dynamic_temperature(Candidates.from_logits(logits), 1.0, 0.5, 1.5).logits
    torch.testing.assert_close(out, logits / t)


def test_dynamic_temperature_single_candidate_and_zero_temperature():
    single = torch.tensor([[3.0, float("-inf")]])
    assert torch.equal(dynamic_temperature(Candidates.from_logits(single), 1.0, 0.5).logits, single)
    peaked = torch.tensor([[200.0, 0.0, 0.0]])  # zero entropy in float32: T' = max(0, 0.2 - 0.5) + 0 = 0
    out = dynamic_temperature(Candidates.from_logits(peaked), 0.2, 0.5, 8.0).dense()
    assert torch.isfinite(out).tolist() == [[True, False, False]]


def test_mirostat_v2_truncates_by_mu_and_updates_it():
    logits = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()
    stage = Mirostat(2, tau=1.5, eta=0.5)  # μ starts at 3 bits: keeps p >= 1/8
    history = History(torch.zeros(1, 1, dtype=torch.long))
    c = stage(Candidates.from_logits(logits), history)
    assert torch.isfinite(c.dense()).sum() == 4
    stage.after_draw(c, torch.tensor([0]), history)  # drew p=0.5: surprise 1 bit
    assert history.state["mirostat_mu"].item() == pytest.approx(3.0 - 0.5 * (1.0 - 1.5))
    history.state["mirostat_mu"] = torch.tensor([1.5])  # keeps p >= 2^-1.5 ≈ 0.354: only the first
    assert torch.isfinite(stage(Candidates.from_logits(logits), history).dense()).sum() == 1


def test_mirostat_v1_keeps_llama_cpp_k():
    probs = torch.tensor([1.0 / (i + 1) ** 1.5 for i in range(200)])  # Zipf, s = 1.5: ŝ is estimated exactly
    probs = probs / probs.sum()
    logits = probs.log().unsqueeze(0)
    stage = Mirostat(1, tau=5.0, eta=0.1)
    history = History(torch.zeros(1, 1, dtype=torch.long))
    c = stage(Candidates.from_logits(logits), history)
    p = probs.tolist()
    t = [math.log((i + 2) / (i + 1)) for i in range(99)]
    b = [math.log(p[i] / p[i + 1]) for i in range(99)]
    s_hat = sum(x * y for x, y in zip(t, b)) / sum(x * x for x in t)
    e = s_hat - 1
    k = ((e * 2 ** 10.0) / (1 - 200 ** (-e))) ** (1 / s_hat)
    assert torch.isfinite(c.dense()).sum() == max(1, min(200, int(k)))


def test_mirostat_state_is_per_row_and_reported():
    cfg = SamplingConfig(do_sample=True, mirostat=2, mirostat_tau=3.0)
    sampler = Sampler(cfg)
    assert sampler.describe() == "logits -> mirostat(v2)"
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    ids = torch.zeros(3, 1, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    first = sampler.step(ids, logits, generator=g)
    assert first.record["mirostat_mu"].tolist() == [6.0, 6.0, 6.0]
    second = sampler.step(ids, logits, generator=g)
    surprise = -torch.log2(first.prob)
    torch.testing.assert_close(second.record["mirostat_mu"], 6.0 - 0.1 * (surprise - 3.0))


# ---- biases, penalties window, min_keep ------------------------------------------------------------------------


def test_logit_bias_minus_100_leaves_a_token_finite_and_minus_inf_removes_it():
    c = Candidates.from_logits(torch.zeros(1, 4))
    out = logit_bias(c, {1: -100.0, 2: float("-inf"), 3: 2.5}).logits
    assert out.tolist() == [[0.0, -100.0, float("-inf"), 2.5]]
    compact = Candidates(torch.zeros(1, 2), torch.tensor([[3, 1]]), 4)
    assert logit_bias(compact, {1: -1.0, 3: 1.0}).logits.tolist() == [[1.0, -1.0]]


def test_sequence_bias_applies_when_its_prefix_is_the_whole_context():
    """transformers skips an entry longer than the context; llmsample applies it when the prefix fits exactly."""
    c = Candidates.from_logits(torch.zeros(1, 4))
    assert sequence_bias(c, History(torch.tensor([[2]])), {(2, 3): -5.0}).logits.tolist() == [[0, 0, 0, -5.0]]
    assert sequence_bias(c, History(torch.tensor([[1]])), {(2, 3): -5.0}).logits.tolist() == [[0, 0, 0, 0]]
    assert sequence_bias(c, History(torch.zeros(1, 0, dtype=torch.long)), {(2, 3): -5.0}).logits.tolist() == [
        [0, 0, 0, 0]]


def test_bad_words_ban_even_when_the_prefix_is_in_the_prompt():
    history = History(torch.tensor([[0, 1]]), prompt_len=2)
    out = bad_words(Candidates.from_logits(torch.zeros(1, 4)), history, ((1, 3), (2,)))
    assert torch.isfinite(out.logits).tolist() == [[True, True, False, False]]


def test_a_chain_that_bans_everything_keeps_the_best_token():
    cfg = SamplingConfig(do_sample=True, bad_words_ids=((0,), (1,), (2,)))
    out = Sampler(cfg).process(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[1.0, 3.0, 2.0]]))
    assert torch.isfinite(out).tolist() == [[False, True, False]]


def test_penalty_window_and_prompt_ignore_length():
    logits = torch.full((1, 5), 1.0)
    ids = torch.tensor([[0, 1, 2, 3, 4]])
    windowed = penalties(Candidates.from_logits(logits), History(ids, prompt_len=2), 2.0, 1.0, 0.0, last_n=2)
    assert windowed.logits.tolist() == [[1.0, 1.0, 1.0, -0.5, -0.5]]  # only 3 and 4: r, then α·1
    ignored = penalties(Candidates.from_logits(logits), History(ids, prompt_len=2), 2.0, prompt_ignore_length=1)
    assert ignored.logits.tolist() == [[1.0, 0.5, 0.5, 0.5, 0.5]]
    none = penalties(Candidates.from_logits(logits), History(ids, prompt_len=2), 2.0, 1.0, 1.0, last_n=0)
    assert none.logits.tolist() == logits.tolist()


@pytest.mark.parametrize("stage, value", [("top_k", 1), ("top_p", 0.01), ("min_p", 0.99), ("typical_p", 0.01),
                                          ("epsilon_cutoff", 0.3), ("eta_cutoff", 0.5), ("top_n_sigma", 0.01)])
def test_every_truncation_keeps_min_tokens_to_keep(stage, value):
    logits = torch.tensor([[5.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    cfg = SamplingConfig(do_sample=True, min_tokens_to_keep=3, **{stage: value})
    assert int(torch.isfinite(Sampler(cfg).process(torch.zeros(1, 1, dtype=torch.long), logits)).sum()) >= 3


def test_neutral_stages_are_not_in_the_chain():
    assert Sampler(SamplingConfig(do_sample=True)).stage_names == ()
    cfg = SamplingConfig(do_sample=True, dry_base=3.0, xtc_threshold=0.2, mirostat_tau=4.0, penalty_last_n=64)
    assert Sampler(cfg).stage_names == ()
    notes = dict(cfg.inactive_settings())
    assert notes["dry_base"] == "no effect while the stage 'dry' is off"
    assert notes["penalty_last_n"] == "no effect while the stage 'penalties' is off"


def test_greedy_keeps_biases_and_penalties_only():
    cfg = SamplingConfig(do_sample=False, logit_bias={1: 1.0}, dry_multiplier=0.8, dry_sequence_breakers=(),
                         xtc_probability=0.5, top_n_sigma=1.0, mirostat=2)
    assert cfg.active_stages() == ("logit_bias", "dry")
    assert cfg.describe_chain() == "logits -> logit_bias -> dry -> greedy"


def test_text_settings_must_be_tokenised_before_sampling():
    with pytest.raises(ValueError, match="tokenized"):
        Sampler(SamplingConfig(do_sample=True, bad_words_ids=("hello",)))
    cfg = SamplingConfig(do_sample=True, logit_bias={"ab": 1.0})
    with pytest.raises(ConfigError, match=r"--logit-bias 'ab' is 2 tokens \[0, 1\]"):
        cfg.tokenized(lambda text: [ord(ch) - 97 for ch in text], 26)
    with pytest.raises(ConfigError, match="token id 30 is beyond the vocabulary"):
        SamplingConfig(logit_bias={30: 1.0}).tokenized(lambda text: [], 26)


@pytest.mark.parametrize("field, value, message", [
    ("dry_multiplier", -1.0, "dry_multiplier must be in [0, inf), got -1.0"),
    ("dry_base", 0.5, "dry_base must be in [1, inf), got 0.5"),
    ("dry_allowed_length", 0, "dry_allowed_length must be an integer >= 1, got 0"),
    ("dry_penalty_last_n", -2, "dry_penalty_last_n must be an integer >= -1, got -2"),
    ("penalty_last_n", 1.5, "penalty_last_n must be an integer >= -1, got 1.5"),
    ("xtc_probability", 1.5, "xtc_probability must be in [0, 1], got 1.5"),
    ("xtc_threshold", -0.1, "xtc_threshold must be in [0, 1], got -0.1"),
    ("epsilon_cutoff", 1.0, "epsilon_cutoff must be in [0, 1), got 1.0"),
    ("eta_cutoff", math.nan, "eta_cutoff must be a number, got nan"),
    ("top_n_sigma", math.inf, "top_n_sigma must be a finite number, got inf"),
    ("mirostat", 3, "mirostat must be 0 or 1 or 2, got 3"),
    ("mirostat_eta", 2.0, "mirostat_eta must be in [0, 1], got 2.0"),
    ("min_tokens_to_keep", 0, "min_tokens_to_keep must be an integer >= 1, got 0"),
    ("dynatemp_range", -0.5, "dynatemp_range must be in [0, inf), got -0.5"),
    ("logit_bias", {"": 1.0}, "logit_bias has an empty token text"),
    ("logit_bias", {5: math.inf}, "logit_bias[5] must be finite or -inf, got inf"),
    ("bad_words_ids", [[]], "bad_words_ids entries must be non-empty lists of token ids, got []"),
    ("dry_sequence_breakers", [""], "dry_sequence_breakers has an empty text"),
    ("sequence_bias", {"1,x": 1.0}, "sequence_bias keys are comma-separated token ids, got '1,x'"),
])
def test_new_fields_are_validated_in_one_line(field, value, message):
    with pytest.raises(ConfigError) as error:
        SamplingConfig(**{field: value})
    assert str(error.value) == message


def test_a_preset_with_only_num_beams_searches_deterministically(tmp_path):
    from llmsample import presets

    path = tmp_path / "beams.toml"
    path.write_text("[sampling]\nnum_beams = 4\n")
    settings = presets.resolve_settings(str(path))
    assert settings.sampling.num_beams == 4 and settings.sampling.do_sample is False
    assert settings.sources["sampling.do_sample"] == f"preset beams"
    with pytest.raises(ConfigError, match="num_beams=4 needs do_sample=false"):
        presets.resolve_settings(str(path), {"sampling": {"do_sample": True}})


@pytest.mark.parametrize("removed", [0.0, 0.3])
def test_top_n_sigma_on_a_full_vocabulary_row(removed):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 262_144, generator=g) * 2.5
    logits[:, :300] += 8
    logits = logits.masked_fill(torch.rand(2, 262_144, generator=g) < removed, float("-inf"))
    out = top_n_sigma(Candidates.from_logits(logits), 1.5).dense()
    for row in range(2):
        alive = logits[row][torch.isfinite(logits[row])].double()
        threshold = alive.max() - 1.5 * alive.std(correction=0)
        expect = torch.isfinite(logits[row]) & (logits[row].double() >= threshold)
        near = (logits[row].double() - threshold).abs() < 1e-4  # float32 rounding of σ decides these
        assert torch.equal(torch.isfinite(out[row]) & ~near, expect & ~near)

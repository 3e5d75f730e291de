"""Fuzzing the config loader, the preset reader and the Sampler: the only failures allowed are the documented
validation errors, and every result keeps the invariants (a token survives, probabilities sum to 1)."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmsample import presets
from llmsample.config import FIELD_NAMES, GENERATION_FIELDS, SamplingConfig
from llmsample.errors import ConfigError, SamplingError
from llmsample.sampling import Sampler

ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.sampled_from(["top_k", "top_p", "temperature", "bogus"]), max_size=4),
)
NUMBERS = st.one_of(st.integers(-5, 300), st.floats(-5, 5), st.sampled_from([math.nan, math.inf, -math.inf]))


def check_config(cfg: SamplingConfig) -> None:
    assert cfg.temperature >= 0 and not math.isnan(cfg.temperature)
    assert isinstance(cfg.top_k, int) and cfg.top_k >= 0
    assert 0 < cfg.top_p <= 1 and 0 <= cfg.min_p <= 1 and 0 < cfg.typical_p <= 1
    assert 0 < cfg.repetition_penalty < math.inf
    assert -2 <= cfg.frequency_penalty <= 2 and -2 <= cfg.presence_penalty <= 2
    assert cfg.num_beams >= 1 and math.isfinite(cfg.length_penalty)
    assert len(set(cfg.order)) == len(cfg.order)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELD_NAMES), st.one_of(ANY_VALUE, NUMBERS), max_size=6))
def test_random_configs_validate_or_raise_config_error(values):
    try:
        cfg = SamplingConfig(**values)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc)
        return
    check_config(cfg)


def toml_value(value) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return presets._toml_value(value)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.dictionaries(st.sampled_from(list(FIELD_NAMES) + ["tempreture", "topk"]), st.one_of(ANY_VALUE, NUMBERS),
                    max_size=5),
    st.dictionaries(st.sampled_from(list(GENERATION_FIELDS) + ["max_tokens"]), st.one_of(ANY_VALUE, NUMBERS),
                    max_size=3),
    st.sampled_from(["", 'extends = "balanced"\n', 'extends = "missing"\n', "garbage = [\n", 'extends = "fuzz"\n']),
)
def test_random_preset_files_resolve_or_raise_config_error(tmp_path_factory, sampling, generation, head):
    folder = tmp_path_factory.mktemp("fuzz")
    text = head + "[sampling]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in sampling.items())
    text += "[generation]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in generation.items())
    path = folder / "fuzz.toml"
    path.write_text(text)
    try:
        resolved = presets.resolve_settings(str(path))
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc)
        return
    check_config(resolved.sampling)
    assert resolved.generation.max_new_tokens >= 1 and resolved.generation.num_samples >= 1


SPECIAL = st.sampled_from([0.0, -0.0, 1e30, -1e30, 3.4e38, -math.inf, math.inf, math.nan, 1e-30])


@st.composite
def odd_logits(draw):
    batch, vocab = draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 5, 300, 3000]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = torch.randn(batch, vocab, generator=g) * draw(st.sampled_from([1e-6, 1.0, 1e4]))
    for _ in range(draw(st.integers(0, 6))):
        logits[draw(st.integers(0, batch - 1)), draw(st.integers(0, vocab - 1))] = draw(SPECIAL)
    if draw(st.booleans()):
        logits = logits.to(draw(st.sampled_from([torch.float16, torch.bfloat16])))
    return logits, torch.randint(0, vocab, (batch, draw(st.integers(0, 8))), generator=g)


@st.composite
def any_valid_config(draw):
    while True:
        try:
            return SamplingConfig(
                do_sample=draw(st.booleans()),
                temperature=draw(st.sampled_from([0.0, 1e-4, 0.5, 1.0, 100.0])),
                top_k=draw(st.integers(0, 400)),
                top_p=draw(st.floats(1e-6, 1.0)),
                min_p=draw(st.floats(0.0, 1.0)),
                typical_p=draw(st.floats(1e-6, 1.0)),
                repetition_penalty=draw(st.floats(1e-3, 1e3)),
                frequency_penalty=draw(st.floats(-2, 2)),
                presence_penalty=draw(st.floats(-2, 2)),
                no_repeat_ngram_size=draw(st.integers(0, 4)),
                order=draw(st.permutations(list(SamplingConfig().order))),
            )
        except ConfigError:  # pragma: no cover - every drawn value is in range
            continue


@settings(max_examples=400, deadline=None)
@given(any_valid_config(), odd_logits())
def test_random_logits_sample_or_raise_sampling_error(cfg, data):
    logits, ids = data
    sampler = Sampler(cfg)
    try:
        out = sampler.process(ids, logits)
        picked = sampler.sample(ids, logits, generator=torch.Generator().manual_seed(0))
    except SamplingError as exc:
        row_max = logits.float().amax(-1)
        assert not torch.isfinite(row_max).all(), f"refused finite logits: {exc}"
        return
    assert (torch.isfinite(out).sum(-1) >= 1).all()
    probs = torch.softmax(out, -1)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(-1).double(), torch.ones(len(out)).double(), atol=1e-4, rtol=0)
    assert torch.isfinite(out.gather(1, picked[:, None])).all()

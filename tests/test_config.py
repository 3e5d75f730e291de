"""SamplingConfig validation: one-line messages naming the field, the bad value and the valid range."""

from __future__ import annotations

import math

import pytest

from llmsample.config import DEFAULT_ORDER, HF_ORDER, SamplingConfig, parse_order
from llmsample.errors import ConfigError, ExitCode

NAN = math.nan


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("temperature", -0.1, "temperature must be in [0, inf), got -0.1"),
        ("temperature", NAN, "temperature must be a number, got nan"),
        ("temperature", math.inf, "temperature must be in [0, inf), got inf"),
        ("temperature", "hot", "temperature must be a number, got 'hot'"),
        ("top_k", -1, "top_k must be an integer >= 0, got -1"),
        ("top_k", 2.5, "top_k must be an integer >= 0, got 2.5"),
        ("top_k", True, "top_k must be an integer >= 0, got True"),
        ("top_p", 1.5, "top_p must be in (0, 1], got 1.5"),
        ("top_p", 0, "top_p must be in (0, 1], got 0"),
        ("top_p", NAN, "top_p must be a number, got nan"),
        ("min_p", -0.01, "min_p must be in [0, 1], got -0.01"),
        ("min_p", 1.01, "min_p must be in [0, 1], got 1.01"),
        ("typical_p", 0.0, "typical_p must be in (0, 1], got 0.0"),
        ("repetition_penalty", 0.0, "repetition_penalty must be in (0, inf), got 0.0"),
        ("repetition_penalty", math.inf, "repetition_penalty must be in (0, inf), got inf"),
        ("frequency_penalty", 2.5, "frequency_penalty must be in [-2, 2], got 2.5"),
        ("presence_penalty", -3, "presence_penalty must be in [-2, 2], got -3"),
        ("no_repeat_ngram_size", -2, "no_repeat_ngram_size must be an integer >= 0, got -2"),
        ("num_beams", 0, "num_beams must be an integer >= 1, got 0"),
        ("length_penalty", math.inf, "length_penalty must be a finite number, got inf"),
        ("length_penalty", NAN, "length_penalty must be a number, got nan"),
        ("early_stopping", "soon", 'early_stopping must be true, false or "never", got \'soon\''),
        ("do_sample", "yes", "do_sample must be true or false, got 'yes'"),
        ("order", "top_k,top_k", "order names the stage 'top_k' twice"),
        ("order", "top_k,tmperature", "order has an unknown stage 'tmperature' (did you mean 'temperature'?)"),
    ],
)
def test_bad_values_name_field_value_and_range(field, value, message):
    with pytest.raises(ConfigError) as info:
        SamplingConfig(**{field: value})
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)
    assert info.value.exit_code == ExitCode.USAGE
    assert isinstance(info.value, ValueError)


def test_beams_with_sampling_is_refused():
    with pytest.raises(ConfigError, match="num_beams=4 needs do_sample=false"):
        SamplingConfig(num_beams=4, do_sample=True)


def test_boundaries_are_accepted():
    cfg = SamplingConfig(temperature=0, top_p=1, min_p=1, typical_p=1, frequency_penalty=-2, presence_penalty=2)
    assert cfg.temperature == 0.0 and isinstance(cfg.temperature, float)


def test_orders_and_aliases():
    assert SamplingConfig().order == DEFAULT_ORDER
    assert DEFAULT_ORDER[-1] == "temperature"
    assert SamplingConfig(order="hf").order == HF_ORDER
    assert parse_order(["Top-K", "temp", "repetition_penalty"]) == ("top_k", "temperature", "penalties")
    assert SamplingConfig(order=["top_p"]).order == ("top_p",)


def test_active_stages_follow_mode_and_order():
    cfg = SamplingConfig(do_sample=True, temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.3)
    assert cfg.active_stages() == ("penalties", "top_k", "top_p", "temperature")
    greedy = cfg.replace(do_sample=False)
    assert greedy.active_stages() == ("penalties",)
    assert ("temperature", "no effect with greedy decoding") in greedy.inactive_settings()
    beam = greedy.replace(num_beams=4)
    assert ("top_p", "no effect with beam search") in beam.inactive_settings()
    assert SamplingConfig(length_penalty=0.9).inactive_settings() == [
        ("length_penalty", "applies to beam search only (num_beams > 1)")
    ]

"""The model contract (language_model.py): both engines meet it alike, and the decode loops use only it."""

from __future__ import annotations

import json

import pytest
import torch

from host_syncs import HostSyncs

from llmsample import gemma3, models
from llmsample.decode import sample_loop
from llmsample.language_model import NativeModel, TransformersModel, wrap
from llmsample.sampling import Sampler
from llmsample.config import SamplingConfig


@pytest.fixture(scope="module")
def both(tiny_gemma_dir):
    """The same tiny Gemma 3 folder on llmsample's engine and on transformers'."""
    return (models.load(str(tiny_gemma_dir), engine="llmsample").language_model,
            models.load(str(tiny_gemma_dir), engine="transformers").language_model)


def test_each_engine_gets_its_adapter_and_a_wrapped_model_is_kept(both):
    native, hf = both
    assert isinstance(native, NativeModel) and isinstance(hf, TransformersModel)
    assert wrap(native) is native and isinstance(native.module, gemma3.Gemma3ForCausalLM)


def test_both_engines_describe_the_model_alike(both):
    native, hf = both
    for attribute in ("vocab_size", "eos_token_ids", "context_length", "device", "dtype"):
        assert getattr(native, attribute) == getattr(hf, attribute), attribute
    assert native.eos_token_ids and native.context_length > 0


def test_forward_with_a_cache_gives_every_positions_logits_and_both_engines_agree(both):
    ids = torch.tensor([[5, 9, 13, 2, 7, 11]])
    results = []
    for lm in both:
        every = lm.all_logits(ids)  # [1, 6, vocab]
        logits, cache = lm.forward(ids[:, :3])
        assert lm.cache_length(cache) == 3 and logits.shape == (1, lm.vocab_size)
        steps = [logits]
        for position in range(3, 6):
            logits, cache = lm.forward(ids[:, position : position + 1], cache)
            steps.append(logits)
        assert lm.cache_length(cache) == 6
        torch.testing.assert_close(torch.stack(steps, dim=1), every[:, 2:], atol=1e-5, rtol=1e-4)
        results.append(every)
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-4)


def test_reorder_makes_a_row_continue_from_another(both):
    for lm in both:
        ids = torch.tensor([[5, 9, 13], [7, 2, 4]])
        _, cache = lm.forward(ids)
        cache = lm.reorder(cache, torch.tensor([1, 1]))
        logits, _ = lm.forward(torch.tensor([[3], [3]]), cache)
        alone, _ = lm.forward(torch.tensor([[7, 2, 4, 3]]))
        torch.testing.assert_close(logits, alone.expand(2, -1), atol=1e-5, rtol=1e-4)


def test_a_long_prompt_reports_its_progress_chunk_by_chunk(both, monkeypatch):
    monkeypatch.setattr(gemma3, "PREFILL_CHUNK", 4)
    native, hf = both
    heard = {"native": [], "hf": []}
    ids = torch.arange(3, 13)[None]  # 10 positions: chunks end at 4, 8, 10
    native.forward(ids, progress=lambda done, total: heard["native"].append((done, total)))
    hf.forward(ids, progress=lambda done, total: heard["hf"].append((done, total)))
    assert heard == {"native": [(4, 10), (8, 10), (10, 10)], "hf": [(10, 10)]}


def test_the_decode_loop_tells_its_phases(both):
    native, _ = both
    phases = []
    cfg = SamplingConfig(do_sample=False)
    steps = list(sample_loop(native, torch.tensor([[5, 9, 13]]), Sampler(cfg), 3,
                             progress=lambda *report: phases.append(report)))
    assert len(steps) == 3 and phases == [("prompt", 3, 3)]


def test_stats_keep_loading_reading_the_prompt_and_generating_apart(cli, tiny_gemma_dir):
    code, out, err = cli("The quick brown fox", "--model", str(tiny_gemma_dir), "-n", "2", "--max-new-tokens", "5",
                         "--ignore-eos", "--seed", "3", "--format", "json", "--stats")
    assert code == 0, err
    stats = json.loads(out)["stats"]
    prompt_len = len(models.load(str(tiny_gemma_dir)).tokenizer("The quick brown fox").input_ids)
    assert stats["prefill_tokens"] == 2 * prompt_len  # both rows read the prompt
    assert stats["new_tokens"] == 10
    assert 0 < stats["prefill_s"] <= stats["first_token_s"]
    assert stats["tokens_per_s"] == pytest.approx(10 / stats["decode_s"])
    assert stats["prefill_tokens_per_s"] == pytest.approx(2 * prompt_len / stats["prefill_s"])
    assert stats["load_s"] > 0  # counted from the process's start: at least the imports
    line = err.strip().splitlines()[-1]
    assert f"prompt {2 * prompt_len} tokens in" in line and "generated 10 tokens in" in line, line


def test_no_progress_bar_reaches_a_pipe(cli, tiny_gemma_dir, monkeypatch):
    """The phases are reported, but stderr is not a terminal: nothing of a bar is drawn there."""
    from llmsample import render

    monkeypatch.setattr(render.PhaseBar, "__init__", _instant_bar(render.PhaseBar.__init__))
    code, out, err = cli("The quick brown fox", "--model", str(tiny_gemma_dir), "--max-new-tokens", "3",
                         "--num-beams", "2")
    assert code == 0 and "━" not in err and "reading the prompt" not in err and "beam search" not in err


def _instant_bar(init):
    def instant(self, err, label, delay=1.0):
        init(self, err, label, 0.0)
    return instant


def test_the_bar_is_drawn_on_a_terminal_once_a_phase_outlasts_its_delay():
    import io
    import time

    from rich.console import Console

    from llmsample.render import PhaseBar

    screen = io.StringIO()
    bar = PhaseBar(Console(file=screen, force_terminal=True, width=80), "reading the prompt", delay=0.05)
    bar.update(512, 4096)
    time.sleep(0.3)
    bar.update(1024, 4096)
    assert bar.shown
    bar.update(4096, 4096)
    assert "reading the prompt" in screen.getvalue()
    quick = PhaseBar(Console(file=io.StringIO(), force_terminal=True), "beam search", delay=5)
    quick.update(3, 3)
    assert not quick.shown


# ---- the static cache and the fixed-shape decode step (what a CUDA graph captures) ---------------------------


@pytest.fixture(scope="module")
def native_module(tiny_gemma_dir):
    return models.load(str(tiny_gemma_dir), engine="llmsample").model


def _greedy_and_sampled(lm, ids, steps=12, seed=None):
    cfg = SamplingConfig(do_sample=seed is not None, temperature=0.9, top_k=20)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.stack([s.token_ids for s in sample_loop(lm, ids, Sampler(cfg), steps, generator=generator)], 1)


@pytest.mark.parametrize("seed", [None, 7])
def test_the_fixed_shape_step_on_a_static_cache_decodes_what_the_growing_cache_does(native_module, seed):
    ids = torch.tensor([[5, 9, 13, 2, 7], [3, 4, 5, 6, 8]])
    fixed = NativeModel(native_module, fixed_step=True)
    assert isinstance(fixed.new_cache(2, 20), gemma3.StaticKVCache)
    assert torch.equal(_greedy_and_sampled(fixed, ids, seed=seed), _greedy_and_sampled(NativeModel(native_module,
                                                                                                    fixed_step=False), ids, seed=seed))


def test_the_fixed_shape_step_gives_the_eager_logits_past_the_sliding_window(native_module):
    window = native_module.config.sliding_window
    ids = torch.arange(3, 3 + window + 2)[None] % native_module.config.vocab_size
    cache = native_module.static_cache(1, window + 12)
    eager_logits, eager_cache = NativeModel(native_module, fixed_step=False).forward(ids)
    fixed_logits, _ = native_module(input_ids=ids, past_key_values=cache).logits[:, -1], cache
    torch.testing.assert_close(fixed_logits, eager_logits)
    token = eager_logits.argmax(-1, keepdim=True)
    for _ in range(8):  # every step now crosses the window's edge
        eager_logits, eager_cache = NativeModel(native_module, fixed_step=False).forward(token, eager_cache)
        fixed_logits = native_module.decode_step(token, cache)
        torch.testing.assert_close(fixed_logits, eager_logits, atol=1e-5, rtol=1e-4)
        token = eager_logits.argmax(-1, keepdim=True)
    assert cache.length == eager_cache.length and int(cache.position) == cache.length


def test_beam_search_on_the_static_cache_reorders_in_place(native_module):
    from llmsample.decode import beam_search

    cfg = SamplingConfig(num_beams=3)
    ids = torch.tensor([[5, 9, 13, 2]])
    fixed = beam_search(NativeModel(native_module, fixed_step=True), ids, Sampler(cfg), 10, num_return_sequences=3)
    eager = beam_search(NativeModel(native_module, fixed_step=False), ids, Sampler(cfg), 10, num_return_sequences=3)
    assert [h.token_ids for h in fixed] == [h.token_ids for h in eager]


def test_the_decode_step_never_waits_for_the_device(native_module):
    cache = native_module.static_cache(2, 16)
    native_module(input_ids=torch.tensor([[5, 9, 13], [2, 7, 4]]), past_key_values=cache)
    with HostSyncs() as syncs:
        for _ in range(3):
            native_module.decode_step(torch.tensor([[3], [4]]), cache)
    assert syncs.seen == []
    with HostSyncs() as syncs:  # the guard does see one
        bool(cache.position.sum() > 0)
    assert syncs.seen == ["_local_scalar_dense"]


def test_a_static_cache_of_the_same_shape_is_reused_emptied_and_decodes_alike(native_module):
    fixed = NativeModel(native_module, fixed_step=True)
    ids = torch.tensor([[5, 9, 13, 2]])
    first = _greedy_and_sampled(fixed, ids, seed=3)
    cache = fixed._spare
    second = _greedy_and_sampled(fixed, ids, seed=3)
    assert fixed._spare is cache and torch.equal(first, second)
    _greedy_and_sampled(fixed, torch.tensor([[5, 9, 13, 2], [1, 2, 3, 4]]), seed=3)
    assert fixed._spare is not cache  # another batch: another cache

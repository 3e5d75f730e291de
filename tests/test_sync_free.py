"""The sampler's sync-free mode (CUDA): the same tokens and distributions, and no value read back within a step."""

from __future__ import annotations

import pytest
import torch
from host_syncs import HostSyncs

from llmsample.config import SamplingConfig
from llmsample.errors import SamplingError
from llmsample.sampling import Sampler

# The chains the CUDA benchmark runs, and the common truncations.
CHAINS = {
    "greedy": dict(do_sample=False),
    "T0.7+k50+p0.9": dict(do_sample=True, temperature=0.7, top_k=50, top_p=0.9),
    "rep1.3+T0.7+p0.9": dict(do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.3),
    "min_p0.05": dict(do_sample=True, min_p=0.05),
    "top_k40": dict(do_sample=True, top_k=40),
    "freq+presence": dict(do_sample=True, frequency_penalty=0.5, presence_penalty=0.3, top_p=0.8),
}


def rows(batch: int, vocab: int = 262_144, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g) * 3
    logits[:, :40] += 12  # a peaked head, as a model's rows have
    logits[0, 1000:1010] = logits[0, 5]  # ties across a boundary
    return logits


@pytest.mark.parametrize("name", CHAINS)
@pytest.mark.parametrize("batch", [1, 4])
def test_a_sync_free_step_never_reads_a_value_back(name, batch):
    cfg = SamplingConfig(**CHAINS[name])
    ids = torch.randint(0, 262_144, (batch, 12))
    sampler = Sampler(cfg, sync_free=True)
    logits = rows(batch)
    with HostSyncs() as syncs:
        sampler.step(ids, logits, generator=torch.Generator().manual_seed(1), prompt_len=4)
    assert syncs.seen == [], syncs.seen
    with HostSyncs() as syncs:  # the ordinary sampler does (it compacts rows to the survivors)
        Sampler(cfg).step(ids, logits, generator=torch.Generator().manual_seed(1), prompt_len=4)
    assert syncs.seen


@pytest.mark.parametrize("name", CHAINS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sync_free_keeps_the_same_tokens_with_the_same_probabilities(name, seed):
    """The same distribution. A draw maps the same uniform number onto the columns in their order, which differs
    (dense rows against rows compacted by value), so a seed's sampled token may differ: as between devices."""
    cfg = SamplingConfig(**CHAINS[name])
    ids = torch.randint(0, 262_144, (3, 10), generator=torch.Generator().manual_seed(seed))
    logits = rows(3, seed=seed)
    ours, theirs = Sampler(cfg, sync_free=True), Sampler(cfg)
    a, b = ours.process(ids, logits, prompt_len=5), theirs.process(ids, logits, prompt_len=5)
    assert torch.equal(torch.isfinite(a), torch.isfinite(b))
    torch.testing.assert_close(torch.softmax(a, -1), torch.softmax(b, -1), atol=1e-6, rtol=1e-5)
    first = ours.step(ids, logits, generator=torch.Generator().manual_seed(seed), prompt_len=5)
    second = theirs.step(ids, logits, generator=torch.Generator().manual_seed(seed), prompt_len=5)
    if not cfg.do_sample:
        assert torch.equal(first.token_ids, second.token_ids)
    expected = torch.softmax(b, -1).gather(1, first.token_ids[:, None]).squeeze(1)
    torch.testing.assert_close(first.prob, expected)
    raw = torch.softmax(logits, -1).gather(1, first.token_ids[:, None]).squeeze(1)
    torch.testing.assert_close(first.raw_prob, raw, rtol=2e-4, atol=1e-7)
    torch.testing.assert_close(first.entropy, second.entropy, atol=1e-5, rtol=1e-5)


def test_unusable_logits_are_reported_after_the_step_with_the_same_error():
    logits = rows(2, vocab=4096)
    logits[1, 7] = float("nan")
    sampler = Sampler(SamplingConfig(do_sample=True, top_p=0.9), sync_free=True)
    ids = torch.zeros(2, 3, dtype=torch.long)
    choice = sampler.step(ids, logits, generator=torch.Generator().manual_seed(0))
    with pytest.raises(SamplingError, match=r"contain NaN \(batch row 1\)"):
        sampler.raise_if_invalid(logits, choice)
    fine = sampler.step(ids, rows(2, vocab=4096), generator=torch.Generator().manual_seed(0))
    sampler.raise_if_invalid(rows(2, vocab=4096), fine)


def test_a_row_emptied_by_a_penalty_keeps_its_best_token_without_a_sync():
    logits = torch.full((2, 4096), -1e38)
    logits[:, 3] = 5.0
    logits[1] = torch.linspace(-1, 1, 4096)
    ids = torch.tensor([[3, 3], [0, 1]])
    cfg = SamplingConfig(do_sample=True, repetition_penalty=1e30, top_k=5)
    for sync_free in (True, False):
        out = Sampler(cfg, sync_free=sync_free).process(ids, logits)
        assert torch.isfinite(out).sum(-1).tolist()[1] == 5
        assert torch.isfinite(out[0]).any()


@pytest.mark.parametrize("name", ["greedy", "T0.7+k50+p0.9", "rep1.3+T0.7+p0.9"])
def test_a_whole_decode_step_model_and_sampler_never_waits(tiny_gemma_dir, name):
    """What a CUDA step runs: the fixed-shape forward on a static cache, then the sync-free sampler."""
    from llmsample import models

    module = models.load(str(tiny_gemma_dir), engine="llmsample").model
    ids = torch.tensor([[5, 9, 13, 2], [3, 4, 6, 8]])
    cache = module.static_cache(2, 12)
    logits = module(input_ids=ids, past_key_values=cache).logits[:, -1]
    sampler = Sampler(SamplingConfig(**CHAINS[name]), sync_free=True)
    generator = torch.Generator().manual_seed(0)
    tokens = sampler.step(ids, logits, generator=generator, prompt_len=4).token_ids
    with HostSyncs() as syncs:
        for _ in range(3):
            ids = torch.cat((ids, tokens[:, None]), dim=1)
            logits = module.decode_step(tokens[:, None], cache)
            tokens = sampler.step(ids, logits, generator=generator, prompt_len=4).token_ids
    assert syncs.seen == []

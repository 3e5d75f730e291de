"""The decode loop's temperature schedule (seed 000: 1.0 for the opening, then 0.6)."""

from __future__ import annotations

import torch

from llmsample.config import SamplingConfig
from llmsample.decode import sample_loop
from llmsample.sampling import Sampler


def test_schedule_changes_the_temperature_from_a_given_token(tiny_lm):
    model, tok = tiny_lm
    ids = tok("The quick", return_tensors="pt").input_ids
    cfg = SamplingConfig(do_sample=True, temperature=1.0, top_k=20)
    steps = list(sample_loop(model, ids, Sampler(cfg), 8, generator=torch.Generator().manual_seed(0),
                             schedule=lambda i: 1.0 if i < 4 else 0.6))
    assert [s.temperature for s in steps] == [1.0] * 4 + [0.6] * 4
    # step 4's reported probability is its probability under the T=0.6 distribution, not the T=1.0 one
    history = torch.cat([ids, torch.stack([s.token_ids for s in steps[:4]], 1)], 1)
    with torch.no_grad():
        logits = model(history).logits[:, -1]
    token = steps[4].token_ids
    for temperature, should_match in ((0.6, True), (1.0, False)):
        processed = Sampler(cfg.replace(temperature=temperature)).process(history, logits, prompt_len=ids.shape[1])
        expected = torch.softmax(processed, -1).gather(1, token[:, None]).squeeze(1)
        assert torch.allclose(steps[4].prob, expected, atol=1e-6) == should_match

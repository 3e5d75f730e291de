"""The CUDA path: skipped where there is no GPU (CI never has one); run on a GPU machine when one is lent."""

from __future__ import annotations

import json

import pytest
import torch

from llmsample.config import SamplingConfig
from llmsample.sampling import Sampler

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize(
    "settings",
    [dict(temperature=0.7, top_k=50, top_p=0.9), dict(temperature=0.7, top_p=0.9, repetition_penalty=1.3),
     dict(min_p=0.05, typical_p=0.9)],
)
def test_sampler_on_cuda_matches_cpu(batch, settings):
    g = torch.Generator().manual_seed(batch)
    logits = torch.randn(batch, 262_144, generator=g) * 2.5
    logits[:, :300] += 8
    ids = torch.randint(0, 400, (batch, 64), generator=g)
    s = Sampler(SamplingConfig(do_sample=True, **settings))
    cpu = s.process(ids, logits)
    gpu = s.process(ids.cuda(), logits.cuda()).cpu()
    assert torch.equal(torch.isfinite(cpu), torch.isfinite(gpu))
    torch.testing.assert_close(torch.softmax(gpu, -1), torch.softmax(cpu, -1), atol=1e-5, rtol=0)
    drawn = s.sample(ids.cuda(), logits.cuda(), generator=torch.Generator(device="cuda").manual_seed(0))
    assert drawn.device.type == "cuda" and torch.isfinite(gpu.gather(1, drawn.cpu()[:, None])).all()


def test_cli_greedy_on_cuda_equals_generate_on_cuda(cli, tiny_model_dir, tiny_lm):
    model, tok = tiny_lm
    code, out, err = cli("The quick", "--model", str(tiny_model_dir), "--device", "cuda", "--greedy",
                         "--max-new-tokens", "16", "--format", "json")
    assert code == 0, err
    result = json.loads(out)
    assert result["device"] == "cuda" and result["dtype"] in ("bfloat16", "float16")
    gpu_model = model.to("cuda", dtype=getattr(torch, result["dtype"]))
    ids = tok("The quick", return_tensors="pt").input_ids.cuda()
    with torch.no_grad():
        expected = gpu_model.generate(ids, do_sample=False, max_new_tokens=16, pad_token_id=0)[0, ids.shape[1]:]
    got = result["samples"][0]["token_ids"]
    assert got == expected.tolist()[: len(got)]


def test_llmsample_gemma3_engine_on_cuda_matches_transformers_on_cuda(tmp_path):
    from tiny_model import build_tiny_gemma3

    from llmsample import models

    folder = build_tiny_gemma3(tmp_path / "gemma")
    for dtype, tol in (("float32", 1e-4), ("bfloat16", 5e-2)):
        ours = models.load(str(folder), device="cuda", dtype=dtype)
        theirs = models.load(str(folder), device="cuda", dtype=dtype, engine="transformers")
        assert ours.engine == "llmsample" and ours.model.device.type == "cuda"
        ids = ours.tokenizer("The quick brown fox jumps", return_tensors="pt").input_ids.cuda()
        with torch.inference_mode():
            a = ours.model(input_ids=ids).logits[:, -1].float()
            b = theirs.model(input_ids=ids).logits[:, -1].float()
        assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())

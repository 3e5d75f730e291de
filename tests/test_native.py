"""llmsample's own Gemma 3 forward (gemma3.py) against transformers' Gemma3ForCausalLM, int8, and the loader."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_model import tiny_gemma3_config

from llmsample import decode_kernel, gemma3, models, quantize
from llmsample.language_model import TransformersModel
from llmsample.errors import ConfigError


def hf_and_native(dtype=torch.float32, seed=0, **overrides):
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(seed)
    hf_config = tiny_gemma3_config(**overrides)
    hf = Gemma3ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for parameter in hf.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)  # norms and weights away from their initial values
    hf = hf.to(dtype)
    native = gemma3.load_native(hf.state_dict(), gemma3.Gemma3Config.from_dict(hf_config.to_dict()), dtype)
    return hf, native


def close(ours, theirs, tol):
    assert ours.shape == theirs.shape
    assert (ours.float() - theirs.float()).abs().max().item() <= tol * max(1.0, theirs.float().abs().max().item())


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": False},
    {"num_key_value_heads": 1},
    {"rope_parameters": {"full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
])
def test_prefill_and_decode_logits_equal_transformers(overrides):
    hf, native = hf_and_native(**overrides)
    ids = torch.randint(3, hf.config.vocab_size, (3, 11))  # longer than the sliding window (4), batch 3
    with torch.inference_mode():
        theirs, ours = hf(input_ids=ids, use_cache=True), native(input_ids=ids)
        close(ours.logits[:, -1], theirs.logits[:, -1], 1e-5)
        hf_cache, cache = theirs.past_key_values, ours.past_key_values
        token = theirs.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(8):  # decode steps past the window, so the sliding layers drop old keys
            theirs = hf(input_ids=token, use_cache=True, **{TransformersModel(hf).cache_keyword: hf_cache})
            ours = native(input_ids=token, past_key_values=cache)
            close(ours.logits[:, -1], theirs.logits[:, -1], 1e-5)
            token = theirs.logits[:, -1].argmax(-1, keepdim=True)
    assert cache.get_seq_length() == 11 + 8


def test_a_prompt_fed_in_pieces_equals_one_prefill():
    _, native = hf_and_native()
    ids = torch.randint(3, 300, (2, 13))
    whole = native(input_ids=ids).logits
    first = native(input_ids=ids[:, :6])
    pieces = native(input_ids=ids[:, 6:], past_key_values=first.past_key_values).logits
    close(pieces, whole, 1e-5)


@pytest.mark.parametrize("chunk, block", [(1, 128), (3, 128), (4, 128), (5, 128), (16, 128), (16, 1), (16, 3),
                                          (16, 5), (13, 4)])
def test_a_long_prompt_read_in_chunks_gives_the_logits_of_one_pass(monkeypatch, chunk, block):
    """Chunks smaller than, equal to and larger than the sliding window (4), and the sliding layers' query blocks
    within a chunk too; all positions, the last, the last 3; then decoding on from the chunked cache. The reference
    is transformers' forward (itself one pass)."""
    hf, native = hf_and_native()
    ids = torch.randint(3, 300, (2, 41))
    monkeypatch.setattr(gemma3, "PREFILL_CHUNK", chunk)
    monkeypatch.setattr(gemma3, "SLIDING_QUERY_BLOCK", block)
    with torch.inference_mode():
        theirs = hf(input_ids=ids, use_cache=True)
        for keep in (0, 1, 3):
            close(native(input_ids=ids, logits_to_keep=keep).logits, theirs.logits[:, -keep:] if keep else
                  theirs.logits, 1e-4)
        ours = native(input_ids=ids)
        token = ours.logits[:, -1].argmax(-1, keepdim=True)
        after_theirs = hf(input_ids=token, use_cache=True, **{TransformersModel(hf).cache_keyword: theirs.past_key_values}).logits
        after_ours = native(input_ids=token, past_key_values=ours.past_key_values).logits
    close(after_ours[:, -1], after_theirs[:, -1], 1e-4)
    monkeypatch.setattr(gemma3, "PREFILL_CHUNK", 10_000)  # the same model in one pass
    with torch.inference_mode():
        close(native(input_ids=ids, logits_to_keep=0).logits, theirs.logits, 1e-4)


def test_beam_reorder_follows_the_rows_like_transformers():
    hf, native = hf_and_native()
    ids = torch.randint(3, hf.config.vocab_size, (3, 7))
    order = torch.tensor([2, 2, 0])
    with torch.inference_mode():
        theirs, ours = hf(input_ids=ids, use_cache=True), native(input_ids=ids)
        theirs.past_key_values.reorder_cache(order)
        ours.past_key_values.reorder_cache(order)
        token = torch.tensor([[5], [6], [7]])
        after_theirs = hf(input_ids=token, use_cache=True, **{TransformersModel(hf).cache_keyword: theirs.past_key_values}).logits
        after_ours = native(input_ids=token, past_key_values=ours.past_key_values).logits
    close(after_ours[:, -1], after_theirs[:, -1], 1e-5)


def test_bfloat16_matches_transformers_in_bfloat16():
    hf, native = hf_and_native(dtype=torch.bfloat16)
    ids = torch.randint(3, hf.config.vocab_size, (2, 9))
    with torch.inference_mode():
        theirs, ours = hf(input_ids=ids).logits[:, -1], native(input_ids=ids).logits[:, -1]
    assert ours.dtype == torch.bfloat16
    close(ours, theirs, 2e-2)


def test_the_transposed_output_projection_gives_the_same_logits():
    _, native = hf_and_native()
    embed = native.get_input_embeddings()
    assert embed.weight_t is not None and torch.equal(embed.weight_t, embed.weight.t())
    hidden = torch.randn(5, embed.embedding_dim)
    for rows in (1, 2, 5):  # 1 and 2 rows use the transposed copy, more rows the original
        close(native.project(hidden[:rows]), hidden[:rows] @ embed.weight.t(), 1e-6)


def test_the_old_config_spelling_reads_the_same():
    new = gemma3.Gemma3Config.from_dict(tiny_gemma3_config().to_dict())
    old = gemma3.Gemma3Config.from_dict({
        "model_type": "gemma3_text", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "sliding_window": 4, "sliding_window_pattern": 3, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
        "query_pre_attn_scalar": 16, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    assert old == new


@pytest.mark.parametrize("change, reason", [
    ({"model_type": "llama"}, "gemma3_text"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "yarn"),
    ({"hidden_activation": "silu"}, "activation"),
])
def test_configs_it_does_not_compute_are_refused(change, reason):
    raw = tiny_gemma3_config().to_dict() | change
    with pytest.raises(gemma3.Unsupported, match=reason):
        gemma3.Gemma3Config.from_dict(raw)


# ---- int8 -------------------------------------------------------------------------------------------------------


def test_quantize_weight_round_trips_within_half_a_step():
    weight = torch.randn(64, 48) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scales
    int8, scales = quantize.quantize_weight(weight)
    assert int8.dtype == torch.int8 and scales.shape == (64,)
    assert ((int8.float() * scales[:, None] - weight).abs() <= scales[:, None] * 0.5001).all()  # 0.5 at the clamped edge


def test_int8_model_stays_close_to_float32_and_its_saved_state_reloads_identically():
    hf, native = hf_and_native(hidden_size=64, intermediate_size=128)
    ids = torch.randint(3, hf.config.vocab_size, (2, 9))
    reference = torch.log_softmax(native(input_ids=ids).logits[:, -1], -1)
    state_dict = hf.state_dict()
    config = gemma3.Gemma3Config.from_dict(hf.config.to_dict())
    int8 = quantize.quantize_int8(gemma3.load_native(state_dict, config, torch.float32))
    assert not any(isinstance(m, torch.nn.Linear) for m in int8.modules())
    assert int8.lm_head is not None and int8.get_input_embeddings().weight_t is None
    logprobs = torch.log_softmax(int8(input_ids=ids).logits[:, -1], -1)
    # Close in distribution (KL in nats) and the same favourite token.
    kl = (reference.exp() * (reference - logprobs)).sum(-1)
    assert kl.max().item() < 0.05
    assert torch.equal(logprobs.argmax(-1), reference.argmax(-1))
    saved = quantize.int8_state(int8)
    reloaded = quantize.from_int8_state(gemma3.load_native(state_dict, config, torch.float32), saved)
    assert torch.equal(reloaded(input_ids=ids).logits, int8(input_ids=ids).logits)


def _head(rows: int, cols: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator) * torch.logspace(-2, 0, rows)[:, None]
    channel_scale = torch.rand(cols, generator=generator) * 3 + 0.2
    head = quantize.Int8Head(*quantize.quantize_weight(weight * channel_scale), channel_scale)
    quantize.pack_for_fbgemm([head])
    return weight, head


FBGEMM = quantize._fbgemm_available()


def test_int8_head_two_part_activations_are_finer_than_bfloat16(monkeypatch):
    weight, head = _head(5000, 64)  # over 4,096 rows: packed in two halves
    if FBGEMM:
        assert head.fbgemm.ready() and len(head.fbgemm.get()) == 2
    x = torch.randn(4, 64) * torch.tensor([[1.0], [1e-3], [50.0], [0.0]])
    x[0, 5] = 40.0  # an outlier channel
    dequantized = (head.int8_weight.double() * head.scales.double()[:, None])
    scaled = x.double() / head.channel_scale.double()
    exact = scaled @ dequantized.t()
    got = head(x).double()
    assert got.shape == (4, 5000) and torch.equal(got[3], torch.zeros(5000, dtype=torch.double))
    # Each activation is off by at most half a fine step (1/(63*126) of its row's largest magnitude).
    bound = scaled.abs().amax(1, keepdim=True) / (63 * 126 * 2) * dequantized.abs().sum(1)[None, :]
    assert ((got - exact).abs() <= bound * 1.001 + 1e-5 * exact.abs()).all()
    monkeypatch.setattr(quantize, "_fbgemm_available", lambda: False)  # a torch without fbgemm: bfloat16, coarser
    fallback = quantize.Int8Head(head.int8_weight, head.scales, head.channel_scale)
    quantize.pack_for_fbgemm([fallback])
    assert "bfloat16" in repr(fallback)
    coarse = fallback(x).double()
    assert (coarse - exact).abs().mean() > 2 * (got - exact).abs().mean()
    assert torch.allclose(coarse, exact, rtol=0.02, atol=0.02 * exact.abs().max().item())


@pytest.mark.skipif(not FBGEMM, reason="this torch has no fbgemm int8 product")
def test_int8_layers_fuse_their_products_and_decode_through_fbgemm_finer_than_bfloat16():
    generator = torch.Generator().manual_seed(1)
    parts = [quantize.Int8Linear(*quantize.quantize_weight(torch.randn(out, 48, generator=generator)))
             for out in (32, 8, 8)]
    fused = quantize.Int8Fused(parts)
    quantize.pack_for_fbgemm([fused, parts[0]])
    weight = torch.cat([p.int8_weight.double() * p.scales.double()[:, None] for p in parts])
    x = torch.randn(3, 48, generator=generator) * torch.tensor([[1.0], [1e-4], [30.0]])
    x[0, 7] = 25.0  # an outlier channel
    exact = x.double() @ weight.t()
    got = fused(x).double()
    bound = x.double().abs().amax(1, keepdim=True) / (63 * 126 * 2) * weight.abs().sum(1)[None, :]
    assert got.shape == (3, 48) and ((got - exact).abs() <= bound * 1.001 + 1e-5 * exact.abs()).all()
    assert torch.allclose(parts[0](x).double(), got[:, :32], rtol=1e-6, atol=1e-6)  # alone: the same product
    bf16 = torch.cat([p.bf16_product(x) for p in parts], dim=1).double()
    assert (bf16 - exact).abs().mean() > 2 * (got - exact).abs().mean()
    rows = x.repeat(6, 1)  # a prompt's chunk (16+ rows): each part in bfloat16, side by side
    assert torch.equal(fused(rows), torch.cat([p.bf16_product(rows) for p in parts], dim=1))


def test_the_head_rescores_its_top_chunks_in_float():
    weight, head = _head(5000, 64)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    int8 = head(x)  # no exact weight yet: the int8 logits as they are
    head.exact_weight = weight
    got = head(x)
    columns = quantize.rescored_columns(int8)
    assert columns.shape == (3, quantize.RESCORE_CHUNKS * quantize.RESCORE_CHUNK + 5000 % quantize.RESCORE_CHUNK)
    exact = x @ weight.t()
    assert torch.allclose(got.gather(1, columns), exact.gather(1, columns), rtol=1e-5, atol=1e-5)
    untouched = torch.ones_like(got, dtype=torch.bool).scatter_(1, columns, False)
    assert torch.equal(got[untouched], int8[untouched])
    for row in range(3):  # the int8 row's highest values lie in the chunks chosen
        assert set(int8[row].topk(quantize.RESCORE_CHUNKS).indices.tolist()) <= set(columns[row].tolist())
    assert torch.equal(got.argmax(1), exact.argmax(1))
    assert quantize.rescored_columns(torch.randn(2, 100)).shape == (2, 100)  # narrow rows: every column


def test_int8_head_channel_scaling_is_exact_in_float_and_saved():
    hf, native = hf_and_native(hidden_size=64, intermediate_size=128)
    config = gemma3.Gemma3Config.from_dict(hf.config.to_dict())
    int8 = quantize.quantize_int8(gemma3.load_native(hf.state_dict(), config, torch.float32))
    gain = (1 + hf.model.norm.weight.detach()).abs()
    assert torch.allclose(int8.lm_head.channel_scale, gain ** quantize.HEAD_GAIN_EXPONENT)
    state = quantize.int8_state(int8)
    assert torch.equal(state["lm_head.channel_scale"], int8.lm_head.channel_scale)
    del state["lm_head.channel_scale"]  # a state saved before the head was channel-scaled
    untouched = gemma3.load_native(hf.state_dict(), config, torch.float32)
    with pytest.raises(KeyError):
        quantize.from_int8_state(untouched, state)
    assert not any(isinstance(m, quantize.Int8Linear) for m in untouched.modules())  # nothing half-swapped


# ---- the loader and the command ---------------------------------------------------------------------------------


def test_auto_engine_runs_a_gemma3_folder_natively_and_matches_transformers(tiny_gemma_dir):
    ours = models.load(str(tiny_gemma_dir), engine="auto")
    theirs = models.load(str(tiny_gemma_dir), engine="transformers")
    assert ours.engine == "llmsample" and theirs.engine == "transformers"
    assert isinstance(ours.model, gemma3.Gemma3ForCausalLM)
    ids = ours.tokenizer("今天天气非常好", return_tensors="pt").input_ids
    with torch.inference_mode():
        close(ours.model(input_ids=ids).logits[:, -1], theirs.model(input_ids=ids).logits[:, -1], 1e-5)


def test_cli_greedy_is_the_same_on_both_engines(cli, tiny_gemma_dir):
    def run(*extra):
        code, out, err = cli("The quick brown fox", "--model", str(tiny_gemma_dir), "--greedy", "--max-new-tokens",
                             "12", "--ignore-eos", "--format", "json", "--stats", *extra)
        assert code == 0, err
        return json.loads(out)

    native, reference = run(), run("--engine", "transformers")
    assert native["samples"][0]["token_ids"] == reference["samples"][0]["token_ids"]
    assert native["stats"]["engine"] == "llmsample" and reference["stats"]["engine"] == "transformers"
    assert native["stats"]["peak_rss_mib"] > 0
    beams = run("--num-beams", "3", "-n", "2")
    assert len(beams["samples"]) == 2
    assert beams["samples"][0]["token_ids"] == run("--num-beams", "3", "-n", "2", "--engine",
                                                   "transformers")["samples"][0]["token_ids"]


def test_cli_quantize_int8_generates_and_reports_it(cli, tiny_gemma_dir):
    code, out, err = cli("The fox", "--model", str(tiny_gemma_dir), "--quantize", "int8", "--greedy",  # < 16 tokens
                         "--max-new-tokens", "6", "--ignore-eos", "--format", "json", "--stats")
    assert code == 0, err
    result = json.loads(out)
    assert len(result["samples"][0]["token_ids"]) == 6
    assert result["stats"]["quantize"] == "int8"
    kernel = "compiled" if decode_kernel.load() is not None else "torch"
    assert result["stats"]["decode_kernel"] == kernel
    assert ("int8 weights, float32 activations (llmsample engine, compiled kernel)" if kernel == "compiled" else "int8 via torch: ") in err
    stats = result["stats"]  # the prompt's end is heard on the int8 path too: reading and generating apart
    assert 0 < stats["prefill_s"] <= stats["first_token_s"] and stats["decode_s"] > 0
    assert not (tiny_gemma_dir / models.INT8_FILE).exists()  # only llmsample's own cache is written to


def test_inspect_and_sweep_take_the_engine_and_int8(cli, tiny_gemma_dir):
    base = ("--model", str(tiny_gemma_dir), "--format", "json")

    def inspect(*extra):
        code, out, err = cli("inspect", "The quick brown fox", "--temperature", "0.7", *base, *extra)
        assert code == 0, err
        return json.loads(out)

    def top(result):
        return [(row["token_id"], row["prob"]) for row in result["steps"][0]["variants"][0]["top"]]

    native, reference, int8 = inspect(), inspect("--engine", "transformers"), inspect("--quantize", "int8")
    assert [t for t, _ in top(native)] == [t for t, _ in top(reference)]
    assert [p for _, p in top(native)] == pytest.approx([p for _, p in top(reference)], abs=1e-5)
    assert top(int8)[0][0] == top(native)[0][0] and top(int8) != top(native)  # int8 ran: close, not identical
    code, out, err = cli("sweep", "The quick brown fox", "--grid", "top_p=0.5,0.9", "--samples", "2",
                         "--max-new-tokens", "4", "--quantize", "int8", *base)
    assert code == 0, err
    assert len(json.loads(out)["points"]) == 2
    code, out, err = cli("sweep", "Hi", "--grid", "top_p=0.5", "--quantize", "int8", "--engine", "transformers", *base)
    assert code == 2 and "needs the llmsample engine" in err and out == ""


@pytest.mark.parametrize("args, message", [
    (["--quantize", "int8", "--engine", "transformers"], "needs the llmsample engine"),
    (["--quantize", "int8", "--dtype", "bfloat16"], "computes in float32"),
    (["--quantize", "int8", "--device-map", "auto"], "CPU only"),
    (["--engine", "llmsample", "--device-map", "auto"], "--device-map"),
    (["--engine", "fast"], "'fast' is not one of"),
])
def test_engine_and_quantize_misuse_is_one_clear_line(cli, tiny_gemma_dir, args, message):
    code, out, err = cli("Hi", "--model", str(tiny_gemma_dir), *args)
    assert code == 2 and out == "" and message in err and "Traceback" not in err


def test_the_llmsample_engine_refuses_a_model_it_does_not_implement(cli, tiny_model_dir):
    code, out, err = cli("Hi", "--model", str(tiny_model_dir), "--engine", "llmsample")
    assert code == 3 and "the llmsample engine cannot run" in err and "llama" in err
    code, out, err = cli("Hi", "--model", str(tiny_model_dir), "--quantize", "int8")
    assert code == 3 and "needed by --quantize" in err
    lm = models.load(str(tiny_model_dir))  # auto: transformers runs it
    assert lm.engine == "transformers"


def test_int8_weights_are_cached_in_llmsamples_own_cache(tmp_path, monkeypatch, tiny_gemma_dir):
    import shutil

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = models.cache_root() / "some-model"
    shutil.copytree(tiny_gemma_dir, folder)
    first = models.load(str(folder), quantize="int8")
    assert (folder / models.INT8_FILE).is_file()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no partial file left
    second = models.load(str(folder), quantize="int8")
    ids = torch.tensor([[1, 5, 9, 14]])
    assert torch.equal(first.model(input_ids=ids).logits, second.model(input_ids=ids).logits)
    # An int8 file from before the output projection was channel-scaled is replaced, not misread.
    from safetensors.torch import load_file, save_file

    old = {k: v for k, v in load_file(folder / models.INT8_FILE).items() if k != "lm_head.channel_scale"}
    save_file(old, str(folder / models.INT8_FILE))
    third = models.load(str(folder), quantize="int8")
    assert "lm_head.channel_scale" in load_file(folder / models.INT8_FILE)
    assert torch.equal(first.model(input_ids=ids).logits, third.model(input_ids=ids).logits)
    with pytest.raises(ConfigError, match="CPU only"):
        models.load(str(folder), device="cuda", quantize="int8")


def test_the_transposed_embedding_is_saved_by_the_first_float32_load_only(tmp_path, monkeypatch, tiny_gemma_dir):
    """int8 runs never read it, so they never write it (0.67 GB for the default model); the first float32 load in
    llmsample's cache writes it, the next maps it and gives the same logits; a folder elsewhere is left alone."""
    import shutil

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = models.cache_root() / "some-model"
    shutil.copytree(tiny_gemma_dir, folder)
    models.load(str(folder), quantize="int8")
    assert not (folder / models.EMBED_T_FILE).exists()
    first = models.load(str(folder))
    assert first.model.config.tie_word_embeddings and (folder / models.EMBED_T_FILE).is_file()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no partial file left
    written = (folder / models.EMBED_T_FILE).stat().st_mtime_ns
    second = models.load(str(folder))
    assert (folder / models.EMBED_T_FILE).stat().st_mtime_ns == written  # read, not written again
    ids = torch.tensor([[1, 5, 9, 14]])
    assert torch.equal(first.model(input_ids=ids).logits, second.model(input_ids=ids).logits)
    (folder / models.EMBED_T_FILE).write_bytes(b"damaged")  # transposed again and replaced, not a reconversion
    third = models.load(str(folder))
    assert torch.equal(first.model(input_ids=ids).logits, third.model(input_ids=ids).logits)
    assert (folder / models.EMBED_T_FILE).stat().st_size > 1000 and (folder / "config.json").is_file()
    elsewhere = tmp_path / "mine"
    shutil.copytree(tiny_gemma_dir, elsewhere)
    models.load(str(elsewhere))
    assert not (elsewhere / models.EMBED_T_FILE).exists()


def test_logits_of_every_position_on_request():
    hf, native = hf_and_native()
    ids = torch.randint(3, hf.config.vocab_size, (2, 10))
    with torch.inference_mode():
        close(native(input_ids=ids, logits_to_keep=0).logits, hf(input_ids=ids).logits, 1e-5)
        close(native(input_ids=ids, logits_to_keep=3).logits, hf(input_ids=ids).logits[:, -3:], 1e-5)

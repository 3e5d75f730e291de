"""The compiled int8 decoding step (decode_kernel.c) against the eager int8 path, and its build cache."""

from __future__ import annotations

import pytest
import torch
from test_native import hf_and_native

from llmsample import decode_kernel, gemma3, quantize

HAS_COMPILER = decode_kernel._compiler() is not None
pytestmark = pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler: the eager path decodes")


def int8_pair(monkeypatch, **overrides):
    """The same int8 model twice: decoding through the kernel, and through the eager torch path."""
    hf, _ = hf_and_native(**overrides)
    config = gemma3.Gemma3Config.from_dict(hf.config.to_dict())
    kernel = quantize.quantize_int8(gemma3.load_native(hf.state_dict(), config, torch.float32))
    with monkeypatch.context() as patch:
        patch.setenv(decode_kernel.DISABLE_VARIABLE, "1")
        eager = quantize.quantize_int8(gemma3.load_native(hf.state_dict(), config, torch.float32))
    assert kernel.kernel_step is not None and eager.kernel_step is None
    return kernel, eager


def decode(model, ids, steps, cache=None):
    """Greedy steps after the prompt ``ids``: each step's logits ``[batch, vocab]`` and the cache."""
    with torch.inference_mode():
        out = model(input_ids=ids, past_key_values=cache)
        cache, logits = out.past_key_values, []
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            out = model(input_ids=token, past_key_values=cache)
            logits.append(out.logits[:, -1].clone())
            token = out.logits[:, -1].argmax(-1, keepdim=True)
    return logits, cache


def agree(ours, theirs):
    """Equal up to the activations' quantization: both paths round each activation to a fine step of its row's
    largest value, and float sums in another order move a value across a step now and then."""
    scale = theirs.abs().max().item()
    assert (ours - theirs).abs().max().item() <= 3e-3 * scale
    p, q = torch.log_softmax(theirs.double(), -1), torch.log_softmax(ours.double(), -1)
    assert (p.exp() * (p - q)).sum(-1).max().item() < 1e-4


@pytest.mark.parametrize("overrides", [
    {},
    {"num_key_value_heads": 1, "hidden_size": 64, "intermediate_size": 96},  # widths not multiples of 64
    {"tie_word_embeddings": False, "head_dim": 32},
    {"vocab": 5000},  # over 16 chunks of 64: the head rescores its best chunks, not every column
])
def test_kernel_steps_equal_the_eager_int8_steps(monkeypatch, overrides):
    kernel, eager = int8_pair(monkeypatch, **overrides)
    ids = torch.randint(3, kernel.config.vocab_size, (3, 6))  # batch 3, then steps past the window (4)
    ours, cache = decode(kernel, ids, 9)
    theirs, eager_cache = decode(eager, ids, 9)
    for a, b in zip(ours, theirs):
        agree(a, b)
    assert cache.get_seq_length() == eager_cache.get_seq_length() == 15
    for layer in range(kernel.config.num_hidden_layers):  # the keys and values it wrote are the eager ones
        for mine, its in ((cache.keys, eager_cache.keys), (cache.values, eager_cache.values)):
            assert torch.allclose(mine[layer][:, :, :15], its[layer][:, :, :15], atol=2e-3, rtol=2e-3)


def test_the_kernels_head_is_the_eager_heads_and_its_top_logits_are_exact(monkeypatch):
    kernel, eager = int8_pair(monkeypatch, vocab=5000)  # over 16 chunks of 64: the best chunks are rescored
    hidden = torch.randn(3, kernel.config.hidden_size, generator=torch.Generator().manual_seed(3)) * 4
    with torch.inference_mode():
        ours = kernel.kernel_step.project(hidden)
        normed = eager.model.norm(hidden)
        theirs = eager.lm_head(normed)
        exact = normed @ eager.get_input_embeddings().weight.t()
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
    top = exact.topk(quantize.RESCORE_CHUNKS).indices
    assert torch.allclose(ours.gather(1, top), exact.gather(1, top), rtol=1e-5, atol=1e-5)


def test_a_cache_written_by_the_kernel_continues_eagerly_and_in_a_static_cache(monkeypatch):
    kernel, eager = int8_pair(monkeypatch)
    ids = torch.randint(3, 300, (1, 5))
    heard = []  # a short prompt read by the kernel still reports its end (--stats splits prompt and decode there)
    with torch.inference_mode():
        kernel(input_ids=ids, progress=lambda done, total: heard.append((done, total)))
    assert heard == [(5, 5)]
    _, cache = decode(kernel, ids, 4)
    more = torch.randint(3, 300, (1, 3))  # a chunk of several tokens: the eager forward reads the kernel's cache
    with torch.inference_mode():
        ours = kernel(input_ids=more, past_key_values=cache).logits[:, -1]
        _, eager_cache = decode(eager, ids, 4)
        theirs = eager(input_ids=more, past_key_values=eager_cache).logits[:, -1]
    agree(ours, theirs)
    static = kernel.static_cache(1, 32)
    ours, cache = decode(kernel, ids, 5, cache=static)
    theirs, _ = decode(eager, ids, 5)
    assert cache is static and int(static.position) == static.length == 10
    for a, b in zip(ours, theirs):
        agree(a, b)


def test_a_damaged_build_is_rebuilt_with_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(decode_kernel, "_loaded", {})
    assert decode_kernel.load() is not None
    built = list((tmp_path / "llmsample" / "kernels").glob("decode-*.so"))
    assert len(built) == 1 and capsys.readouterr().err == ""
    damaged = built[0].with_suffix(".partial")  # truncated, as another process's disk might leave it (replaced,
    damaged.write_bytes(built[0].read_bytes()[:1000])  # not cut in place: this process has the file mapped)
    damaged.replace(built[0])
    monkeypatch.setattr(decode_kernel, "_loaded", {})
    lib = decode_kernel.load()
    err = capsys.readouterr().err
    assert lib is not None and lib.kernel_abi() == decode_kernel.KERNEL_ABI
    assert err.count("\n") == 1 and "damaged; building it again" in err
    monkeypatch.setattr(decode_kernel, "_loaded", {})
    assert decode_kernel.load() is not None and capsys.readouterr().err == ""  # the new build is kept


def test_without_a_compiler_or_when_disabled_the_eager_path_decodes(monkeypatch, tmp_path):
    monkeypatch.setattr(decode_kernel, "_loaded", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("PATH", str(tmp_path))  # neither cc nor gcc
    assert decode_kernel.load() is None
    monkeypatch.undo()
    monkeypatch.setenv(decode_kernel.DISABLE_VARIABLE, "1")
    assert decode_kernel.load() is None
    monkeypatch.setenv(decode_kernel.DISABLE_VARIABLE, "0")
    assert decode_kernel.load() is not None


def test_stats_say_which_path_decoded(cli, tiny_gemma_dir, monkeypatch):
    import json

    args = ("The fox", "--model", str(tiny_gemma_dir), "--quantize", "int8", "--greedy", "--max-new-tokens", "4",
            "--ignore-eos", "--format", "json", "--stats")
    for disabled, label, line in (("0", "compiled", "int8 weights, float32 activations (llmsample engine, compiled kernel)"),
                                  ("1", "torch", "int8 via torch: LLMSAMPLE_NO_KERNEL is set")):
        monkeypatch.setenv(decode_kernel.DISABLE_VARIABLE, disabled)
        code, out, err = cli(*args)
        assert code == 0, err
        assert json.loads(out)["stats"]["decode_kernel"] == label and line in err.splitlines()[-1]
    monkeypatch.setenv(decode_kernel.DISABLE_VARIABLE, "0")
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setattr(decode_kernel.shutil, "which", lambda name: None)  # no cc, no gcc on this PATH either
    code, out, err = cli(*args)
    stats = json.loads(out)["stats"]
    assert code == 0 and stats["decode_kernel"] == "torch" and stats["decode_kernel_note"].startswith("no C compiler")
    assert "int8 via torch: no C compiler" in err.splitlines()[-1]
    code, out, err = cli(*args[:3], "--dtype", "float32", *args[5:])  # not int8: nothing to say
    assert code == 0 and json.loads(out)["stats"]["decode_kernel"] is None and "kernel" not in err


def test_a_cache_the_kernel_cannot_write_is_left_to_the_torch_path(monkeypatch):
    kernel, eager = int8_pair(monkeypatch)
    ids = torch.randint(3, 300, (3, 5))
    with torch.inference_mode():
        cache = kernel(input_ids=ids).past_key_values
        # Laid out [kv_heads, batch, …] in memory: the same values and shape, not the blocks the C side writes.
        cache.keys[1] = cache.keys[1].transpose(0, 1).contiguous().transpose(0, 1)
        token = torch.tensor([[4], [5], [6]])
        assert kernel.kernel_step.step(token, cache) is None and cache.get_seq_length() == 5
        ours = kernel(input_ids=token, past_key_values=cache).logits[:, -1]
        eager_cache = eager(input_ids=ids).past_key_values
        theirs = eager(input_ids=token, past_key_values=eager_cache).logits[:, -1]
    assert cache.get_seq_length() == 6
    # The kernel model's torch path multiplies few rows in bfloat16 (no fbgemm packing): close, not equal.
    assert torch.allclose(ours, theirs, atol=0.05 * theirs.abs().max().item())


def test_beam_search_and_samples_decode_the_same_through_the_kernel(cli, tiny_gemma_dir, monkeypatch):
    """Beam search reorders the cache between steps and -n decodes rows side by side; with a margin between the
    candidates (the tiny model's logits are far apart), both paths pick the same tokens."""
    import json

    runs = {}
    for disabled in ("0", "1"):
        monkeypatch.setenv(decode_kernel.DISABLE_VARIABLE, disabled)
        for extra in (("--num-beams", "3", "-n", "2"), ("-n", "3", "--seed", "5", "--top-k", "3")):
            code, out, err = cli("The fox", "--model", str(tiny_gemma_dir), "--quantize", "int8",
                                 "--max-new-tokens", "8", "--ignore-eos", "--format", "json", *extra)
            assert code == 0, err
            runs[disabled, extra] = [s["token_ids"] for s in json.loads(out)["samples"]]
    for extra in {extra for _, extra in runs}:
        assert runs["0", extra] == runs["1", extra] and len(runs["0", extra]) in (2, 3)


def test_a_nan_weight_gives_nan_logits_as_the_torch_path_does(monkeypatch):
    """The NaN check that finds a damaged model cache reads the logits: the kernel must not round NaN away."""
    kernel, eager = int8_pair(monkeypatch)
    ids = torch.randint(3, 300, (2, 4))
    for model in (kernel, eager):
        with torch.inference_mode():
            cache = model(input_ids=ids).past_key_values
            model.model.layers[1].input_layernorm.gain[3] = float("nan")  # the tensor the kernel reads too
            logits = model(input_ids=torch.tensor([[7], [8]]), past_key_values=cache).logits
        assert logits.isnan().all()


def test_two_threads_decoding_at_once_get_what_each_gets_alone(monkeypatch):
    """The kernel's worker threads serve one call at a time; a second caller meanwhile computes alone."""
    import threading

    models = [int8_pair(monkeypatch, vocab=5000)[0] for _ in range(2)]
    ids = torch.randint(3, 5000, (2, 6), generator=torch.Generator().manual_seed(4))
    alone = [decode(model, ids, 12)[0] for model in models]
    together: list = [None, None]

    def run(i):
        together[i] = decode(models[i], ids, 12)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for mine, its in zip(together, alone):
        assert all(torch.equal(a, b) for a, b in zip(mine, its))


def test_the_thread_count_does_not_change_a_single_bit(monkeypatch):
    """Each output is summed by one thread in a fixed order (the attention's key ranges follow the context, not
    the threads), so a seed gives the same text on one core or many."""
    kernel, _ = int8_pair(monkeypatch, vocab=5000)
    ids = torch.randint(3, 5000, (2, 7), generator=torch.Generator().manual_seed(5))
    saved = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(decode(kernel, ids, 70)[0])  # past 64 keys: several key ranges per row
    finally:
        torch.set_num_threads(saved)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))


def _stat_rows():
    """Rows for the kernel's statistics: wide and narrow, ragged widths, ties at the top (first column wins),
    removed tokens, a huge spread, a peak, a flat row, and the rows a sampler must refuse."""
    g = torch.Generator().manual_seed(6)
    rows = [torch.randn(3, 262_144, generator=g) * 4, torch.randn(2, 100_003, generator=g) * 30,
            torch.randn(1, 7, generator=g), torch.zeros(1, 8_193)]
    tied = torch.randn(2, 50_000, generator=g)
    tied[0, [17, 40_000]] = 9.0
    tied[1, [33_000, 49_999]] = 9.0
    coarse = (torch.randn(2, 70_001, generator=g) * 2).round()  # thousands of ties across the list's end
    removed = torch.randn(2, 20_000, generator=g) * 3
    removed[0, ::2] = float("-inf")
    removed[1, :19_999] = float("-inf")  # only the last token left
    peak = torch.randn(1, 30_000, generator=g)
    peak[0, 5] = 200.0  # every other weight underflows
    return rows + [tied, coarse, removed, peak]


def test_the_kernels_row_statistics_are_the_float64_ones():
    from llmsample.sampling.row_stats import TOP, RowStats

    lib = decode_kernel.load()
    for logits in _stat_rows():
        ours, exact = decode_kernel.row_stats(lib, logits), RowStats.of(logits)
        assert torch.equal(ours.top, exact.top) and torch.equal(ours.argmax, exact.argmax)
        assert torch.equal(ours.chunk_maxima, exact.chunk_maxima) and ours.finite is exact.finite is True
        assert torch.allclose(ours.log_total, exact.log_total, rtol=2e-7, atol=2e-6)
        assert torch.allclose(ours.entropy, exact.entropy, rtol=1e-5, atol=2e-6)
        # the highest logits, highest first, ties in column order: exactly a stable descending sort's first ones
        assert torch.equal(ours.top_values, exact.top_values) and torch.equal(ours.top_columns, exact.top_columns)
        assert ours.top_values.shape[1] == min(logits.shape[1], TOP) and lib.stats_top() == TOP


def test_the_kernels_row_statistics_flag_unusable_rows():
    lib = decode_kernel.load()
    logits = torch.randn(4, 20_000)
    logits[0, 11_000] = float("nan")
    logits[1, 3] = float("inf")
    logits[2] = float("-inf")
    stats = decode_kernel.row_stats(lib, logits)
    assert stats.top[0].isnan().all() and stats.log_total[0].isnan().all()
    assert stats.top[1].item() == float("inf") and stats.top[2].item() == float("-inf")
    assert not bool(torch.isfinite(stats.top[:3]).any()) and bool(torch.isfinite(stats.top[3]).all())
    assert stats.finite is False and decode_kernel.row_stats(lib, logits[3:]).finite is True


def test_a_kernel_step_hands_its_statistics_to_the_sampler(monkeypatch):
    """The decode loop passes them on; tokens are the ones the sampler picks without them, and the probabilities
    and entropies agree to float rounding."""
    from llmsample.config import SamplingConfig
    from llmsample.decode import sample_loop
    from llmsample.language_model import wrap
    from llmsample.sampling import Sampler
    from llmsample.sampling.row_stats import RowStats

    kernel, _ = int8_pair(monkeypatch, vocab=5000)
    lm = wrap(kernel)
    ids = torch.randint(3, 5000, (2, 5), generator=torch.Generator().manual_seed(7))
    logits, cache = lm.forward(ids)
    logits, cache = lm.forward(logits.argmax(-1, keepdim=True), cache)
    stats = lm.row_stats(logits)
    assert stats is not None and lm.row_stats(logits.clone()) is None
    assert torch.equal(stats.argmax, RowStats.of(logits).argmax)
    for cfg in (SamplingConfig(), SamplingConfig(do_sample=True, top_k=64, top_p=0.95),
                SamplingConfig(do_sample=True, temperature=1.0)):
        runs = []
        for given in (True, False):
            sampler = Sampler(cfg)
            if not given:  # the same loop, the statistics withheld
                monkeypatch.setattr(lm, "row_stats", lambda logits: None)
            runs.append(list(sample_loop(lm, ids, sampler, 12, generator=torch.Generator().manual_seed(8))))
            monkeypatch.undo()
        for with_stats, without in zip(*runs):
            assert torch.equal(with_stats.token_ids, without.token_ids)
            for field in ("prob", "raw_prob", "entropy"):
                assert torch.allclose(getattr(with_stats, field), getattr(without, field), rtol=1e-4, atol=1e-6)


def test_a_prompt_read_by_the_torch_path_hands_its_last_rows_statistics_on(monkeypatch):
    """A prompt too long for the kernel's step is read the eager way; its last position's statistics still come
    with it (the first token's sampler takes the same shortcuts as every later one), and only for that position."""
    from llmsample.language_model import wrap
    from llmsample.quantize import BF16_PRODUCT_ROWS
    from llmsample.sampling.row_stats import RowStats

    kernel, _ = int8_pair(monkeypatch, vocab=5000)
    lm = wrap(kernel)
    ids = torch.randint(3, 5000, (2, BF16_PRODUCT_ROWS), generator=torch.Generator().manual_seed(3))
    assert not kernel.kernel_step.takes(ids, 1)
    logits, _ = lm.forward(ids)
    stats, exact = lm.row_stats(logits), RowStats.of(logits)
    assert stats is not None and torch.equal(stats.argmax, exact.argmax)
    assert torch.allclose(stats.log_total, exact.log_total, rtol=0, atol=1e-5)
    assert torch.equal(stats.top_columns, exact.top_columns)
    assert kernel(ids, logits_to_keep=0).row_stats is None  # every position's logits: none

"""``generate --force STEP=TOKEN``: the forced token replaces the draw, the rest continues with the seed."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmsample.config import SamplingConfig
from llmsample.sampling import Sampler


def run_json(cli, model_dir, *args):
    code, out, err = cli("generate", "The quick", "-m", str(model_dir), "--format", "json", "--seed", "3",
                         "--max-new-tokens", "6", *args)
    assert code == 0, err
    return json.loads(out)


def test_the_forced_token_is_taken_by_every_sample_and_marked(cli, tiny_model_dir):
    plain = run_json(cli, tiny_model_dir, "-n", "2")
    forced = run_json(cli, tiny_model_dir, "-n", "2", "--force", "3=#82")
    for before, after in zip(plain["samples"], forced["samples"]):
        assert after["token_ids"][2] == 82
        assert after["token_ids"][:2] == before["token_ids"][:2]  # nothing changes before the forced step
        assert after["forced"] == [False, False, True, False, False, False]
        assert after["raw_probs"][2] > 0
    assert "forced" not in plain["samples"][0]
    assert forced["settings"]["force"] == [{"step": 3, "token_id": 82, "token": "p"}]
    assert plain["settings"]["force"] == []


def test_forcing_the_drawn_token_changes_nothing_after_it(cli, tiny_model_dir):
    """The draw at a forced step still takes its random number: forcing the token the seed would have drawn gives
    the unforced run token for token, so the steps after a force use the seed's own stream."""
    plain = run_json(cli, tiny_model_dir)["samples"][0]
    drawn = plain["token_ids"][1]
    forced = run_json(cli, tiny_model_dir, "--force", f"2=#{drawn}")["samples"][0]
    assert forced["token_ids"] == plain["token_ids"]
    assert forced["probs"] == plain["probs"] and forced["raw_probs"] == plain["raw_probs"]
    assert forced["forced"] == [False, True, False, False, False, False]


def test_a_forced_token_the_chain_removed_has_final_probability_0(cli, tiny_model_dir):
    greedy = run_json(cli, tiny_model_dir, "--greedy")["samples"][0]
    other = 82 if greedy["token_ids"][1] != 82 else 83
    out = run_json(cli, tiny_model_dir, "--top-k", "1", "--force", f"2=#{other}", "--candidates", "3")
    sample = out["samples"][0]
    assert sample["token_ids"][1] == other
    assert sample["probs"][1] == 0.0 and sample["raw_probs"][1] > 0.0
    table = sample["candidates"][1]
    assert table["forced"] is True
    row = [c for c in table["candidates"] if c["token_id"] == other]
    assert len(row) == 1 and row[0]["chosen"] and row[0]["removed_by"] == "top_k"  # shown though not in the top 3
    assert len(table["candidates"]) == 4
    assert "forced" not in sample["candidates"][0]


def test_greedy_continues_greedily_after_a_force(cli, tiny_model_dir):
    greedy = run_json(cli, tiny_model_dir, "--greedy")["samples"][0]
    other = 82 if greedy["token_ids"][0] != 82 else 83
    forced = run_json(cli, tiny_model_dir, "--greedy", "--force", f"1=#{other}")["samples"][0]
    # Greedy before and after the force: another seed gives the same tokens.
    code, out, err = cli("generate", "The quick", "-m", str(tiny_model_dir), "--format", "json", "--greedy",
                         "--max-new-tokens", "6", "--force", f"1=#{other}", "--seed", "99")
    assert code == 0, err
    assert json.loads(out)["samples"][0]["token_ids"] == forced["token_ids"]
    assert forced["token_ids"][0] == other
    assert forced["probs"][0] == forced["raw_probs"][0] > 0  # greedy runs no truncation: the model's probability



def test_the_stages_that_read_the_text_see_the_forced_token(cli, tiny_model_dir):
    """no_repeat_ngram 1 bans every token already in the text. Biased, 83 would be the greedy pick and 82 the next;
    forcing 82 at step 1 puts 82, not the pick it replaced, into the text: 83 comes next and 82 never again."""
    out = run_json(cli, tiny_model_dir, "--greedy", "--no-repeat-ngram-size", "1", "--logit-bias", "82=10",
                   "--logit-bias", "83=12", "--force", "1=#82", "--max-new-tokens", "8")
    tokens = out["samples"][0]["token_ids"]
    assert tokens[:2] == [82, 83] and 82 not in tokens[1:] and len(set(tokens)) == len(tokens)


def test_a_text_token_and_jsonl_marks(cli, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tokenizer.encode(" jumps", add_special_tokens=False)) == 1
    code, out, err = cli("generate", "The quick", "-m", str(tiny_model_dir), "--format", "jsonl", "--seed", "3",
                         "--max-new-tokens", "3", "--force", "2= jumps")
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    tokens = [e for e in events if e["type"] == "token"]
    assert tokens[1]["text"] == " jumps" and tokens[1]["forced"] is True
    assert "forced" not in tokens[0] and "forced" not in tokens[2]


def test_the_candidate_table_says_forced(cli, tiny_model_dir):
    code, out, err = cli("generate", "The quick", "-m", str(tiny_model_dir), "--seed", "3", "--max-new-tokens", "2",
                         "--force", "2=#82", "--candidates", "3", "--no-color")
    assert code == 0, err
    assert "step 1 · chose" in err and 'step 2 · forced "p"' in err


@pytest.mark.parametrize("spec, message", [
    ("x", "--force takes STEP=TOKEN (STEP a generated token's number from 1, TOKEN a text that is one token or #ID), "
          "got 'x'"),
    ("3=", "--force takes STEP=TOKEN"),
    ("0=a", "--force '0=a': STEP counts generated tokens from 1, got 0"),
    ("7=a", "--force '7=a': step 7 is beyond --max-new-tokens 6"),
])
def test_bad_specs_are_refused_before_the_model_loads(cli, tmp_path, spec, message):
    code, out, err = cli("generate", "hi", "-m", str(tmp_path / "no-such-model"), "--max-new-tokens", "6",
                         "--force", spec)
    assert code == 2 and out == ""
    assert err.startswith("llmsample: error: " + message) and err.count("\n") == 1


def test_two_forces_on_one_step_and_beam_search_are_refused(cli, tmp_path):
    missing = str(tmp_path / "no-such-model")
    code, _, err = cli("generate", "hi", "-m", missing, "--force", "2=a", "--force", "2=#5")
    assert code == 2 and err == "llmsample: error: --force gives step 2 twice: '2=a' and '2=#5'\n"
    code, _, err = cli("generate", "hi", "-m", missing, "--num-beams", "2", "--force", "1=a")
    assert code == 2 and "--force does not apply to beam search (--num-beams 2)" in err


def test_force_is_refused_with_a_serving_engine(cli):
    """The server draws its own tokens: nothing could take the forced one (refused before any connection)."""
    code, out, err = cli("generate", "hi", "--base-url", "http://127.0.0.1:9", "-m", "x", "--force", "1=a")
    assert code == 2 and out == ""
    assert err == "llmsample: error: --force needs a local model: a serving engine draws its tokens itself\n"


def test_a_text_that_is_not_one_token_names_how_many(cli, tiny_model_dir):
    code, out, err = cli("generate", "hi", "-m", str(tiny_model_dir), "--force", "1=xyzw")
    assert code == 2 and out == ""
    assert err == ("llmsample: error: --force '1=xyzw': 'xyzw' is 4 tokens [90, 91, 92, 89] for this model's "
                   "tokenizer: give a text that is one token, or its id as #ID\n")
    code, _, err = cli("generate", "hi", "-m", str(tiny_model_dir), "--force", "1=#99999")
    assert code == 2 and "token id 99999 is beyond the vocabulary (ids 0.." in err


def test_the_constraint_must_allow_the_forced_token(cli, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    first = tokenizer.encode(" jumps", add_special_tokens=False)[0]
    code, out, err = cli("generate", "The quick", "-m", str(tiny_model_dir), "--choice", " jumps over",
                         "--choice", " lazy", "--format", "json", "--seed", "1", "--force", f"1=#{first}")
    assert code == 0, err
    assert json.loads(out)["text"] == " jumps over"
    code, out, err = cli("generate", "The quick", "-m", str(tiny_model_dir), "--choice", " jumps over",
                         "--choice", " lazy", "--seed", "1", "--force", "1=#82")
    assert code == 2
    assert err.splitlines()[-1] == ("llmsample: error: --force '1=#82': the choice does not allow 'p' (token 82) at "
                                    "step 1")


# ---- the sampler ------------------------------------------------------------------------------------------------


def _logits(seed: int = 0, batch: int = 2, vocab: int = 50) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("sync_free", [False, True])
def test_step_with_force_reports_the_chains_probability(sync_free):
    cfg = SamplingConfig(do_sample=True, top_k=5, temperature=0.7)
    logits, ids = _logits(), torch.zeros(2, 3, dtype=torch.long)
    processed = Sampler(cfg).process(ids, logits)
    kept = int(processed[0].argmax())
    removed = int(processed[1].argmin())  # cut by top_k
    choice = Sampler(cfg, sync_free=sync_free).step(ids, logits, generator=torch.Generator().manual_seed(0),
                                                     force=torch.tensor([kept, removed]))
    assert choice.token_ids.tolist() == [kept, removed]
    assert choice.forced.tolist() == [True, True]
    assert math.isclose(float(choice.prob[0]), float(torch.softmax(processed[0], -1)[kept]), rel_tol=1e-5)
    assert float(choice.prob[1]) == 0.0
    assert math.isclose(float(choice.raw_prob[1]), float(torch.softmax(logits[1], -1)[removed]), rel_tol=1e-5)


def test_the_draw_still_takes_its_random_number():
    cfg = SamplingConfig(do_sample=True, top_p=0.9)
    logits, ids = _logits(), torch.zeros(2, 3, dtype=torch.long)
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    Sampler(cfg).step(ids, logits, generator=a)
    Sampler(cfg).step(ids, logits, generator=b, force=torch.tensor([1, -1]))
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


def test_mirostat_learns_from_a_forced_token_as_if_drawn():
    cfg = SamplingConfig(do_sample=True, mirostat=2, mirostat_tau=3.0, mirostat_eta=0.5)
    logits, ids = _logits(1), torch.zeros(2, 3, dtype=torch.long)
    drawn = Sampler(cfg)
    choice = drawn.step(ids, logits, generator=torch.Generator().manual_seed(0))
    forced = Sampler(cfg)
    forced.step(ids, logits, generator=torch.Generator().manual_seed(7), force=choice.token_ids)
    assert torch.allclose(forced.state["mirostat_mu"], drawn.state["mirostat_mu"])
    # A token mirostat itself cut (probability 0) counts with its raw probability: μ moves, and stays finite.
    worst = logits.argmin(-1)
    late = Sampler(cfg)
    late.step(ids, logits, force=worst)
    raw_surprise = -torch.log_softmax(logits, -1).gather(1, worst[:, None]).squeeze(1) / math.log(2)
    assert torch.allclose(late.state["mirostat_mu"], 6.0 - 0.5 * (raw_surprise - 3.0))


def test_trace_shows_a_forced_token_once():
    cfg = SamplingConfig(do_sample=True, top_k=2)
    logits, ids = _logits(2), torch.zeros(2, 3, dtype=torch.long)
    top = int(logits[0].argmax())
    low = int(logits[1].argmin())
    trace = Sampler(cfg).trace(ids, logits, 3, extra_ids=torch.tensor([top, low]))
    first, second = trace.to_dict(0), trace.to_dict(1)
    assert [c["token_id"] for c in first["candidates"]].count(top) == 1 and len(first["candidates"]) == 3
    assert second["candidates"][-1]["token_id"] == low and len(second["candidates"]) == 4
    assert second["candidates"][-1]["removed_by"] == "top_k"
    shown = sum(c["raw_prob"] for c in second["candidates"])
    assert math.isclose(second["raw_mass_outside"], 1 - shown, abs_tol=1e-6)


@pytest.mark.parametrize("settings", [dict(do_sample=True, temperature=0.7, top_k=50, top_p=0.9),
                                      dict(do_sample=True, mirostat=2)])
def test_a_forced_sync_free_step_reads_nothing_back(settings):
    """On CUDA a forced step stays sync-free (a constraint's check is the one read-back, at forced steps only)."""
    from host_syncs import HostSyncs

    ids = torch.randint(0, 4096, (2, 6))
    logits = _logits(3, vocab=4096)
    sampler = Sampler(SamplingConfig(**settings), sync_free=True)
    with HostSyncs() as syncs:
        choice = sampler.step(ids, logits, generator=torch.Generator().manual_seed(1), prompt_len=2,
                              force=torch.tensor([7, -1]))
    assert syncs.seen == [], syncs.seen
    assert int(choice.token_ids[0]) == 7 and choice.forced.tolist() == [True, False]

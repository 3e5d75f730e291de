"""The constraint stage: JSON schema, grammar (GBNF and Lark), regex and choice, through the CLI and the sampler."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
        "ok": {"type": "boolean"},
        "tag": {"enum": ["a", "b", "c"]},
        "list": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3},
    },
    "required": ["name", "n", "ok", "tag", "list"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,6}(-[0-9]{1,3})?"
CHOICES = ["red", "green", "blue sky"]
GBNF = 'root ::= term ("+" term){0,3}\nterm ::= [0-9]{1,2}\n'
GBNF_AS_REGEX = r"[0-9]{1,2}(\+[0-9]{1,2}){0,3}"
LARK = 'start: greeting " " name\ngreeting: "hello" | "hi"\nname: /[A-Z][a-z]{1,5}/\n'
LARK_AS_REGEX = r"(hello|hi) [A-Z][a-z]{1,5}"


def _json_valid(text: str) -> bool:
    import jsonschema

    jsonschema.validate(json.loads(text), SCHEMA)
    return True


def _run(cli, *args: str) -> tuple[int, dict, str]:
    code, out, err = cli(*args, "--format", "json")
    return code, (json.loads(out) if out.strip() else {}), err


@pytest.mark.parametrize("flags, valid", [
    (("--json-schema", json.dumps(SCHEMA)), _json_valid),
    (("--regex", REGEX), lambda text: re.fullmatch(REGEX, text) is not None),
    (("--choice", CHOICES[0], "--choice", CHOICES[1], "--choice", CHOICES[2]), lambda text: text in CHOICES),
    (("--grammar", "GBNF"), lambda text: re.fullmatch(GBNF_AS_REGEX, text) is not None),
    (("--grammar", "LARK"), lambda text: re.fullmatch(LARK_AS_REGEX, text) is not None),
], ids=["json_schema", "regex", "choice", "gbnf", "lark"])
def test_fifty_samples_of_a_random_model_all_validate(cli, tiny_model_dir, tmp_path, flags, valid):
    """The hardest case: a random model wants to write garbage. 50 rows, each with its own parser, all valid."""
    if flags[0] == "--grammar":
        path = tmp_path / "g.txt"
        path.write_text(GBNF if flags[1] == "GBNF" else LARK)
        flags = ("--grammar", str(path))
    code, data, err = _run(cli, "Hello", "-m", str(tiny_model_dir), *flags, "-n", "50", "--seed", "7",
                           "--max-new-tokens", "120")
    assert code == 0, err
    assert len(data["samples"]) == 50
    for sample in data["samples"]:
        assert sample["complete"] is True, sample["text"]
        assert sample["finish_reason"] == "eos"
        assert valid(sample["text"]), sample["text"]
    assert len({s["text"] for s in data["samples"]}) > 1  # each row drew its own text
    assert "warning" not in err


def test_sampling_with_other_stages_and_greedy_and_beams_all_honour_it(cli, tiny_model_dir):
    regex = r"(ab|cd)+e"
    for extra in (("--greedy",), ("--top-k", "5", "--temperature", "1.5", "--top-p", "0.9"),
                  ("--num-beams", "3", "-n", "3")):
        code, data, err = _run(cli, "Hi", "-m", str(tiny_model_dir), "--regex", regex, "--seed", "3",
                               "--max-new-tokens", "30", *extra)
        assert code == 0, err
        for sample in data["samples"]:
            assert re.fullmatch(regex, sample["text"]), (extra, sample["text"])
            assert sample["complete"] is True
    assert data["settings"]["chain"] == "logits -> grammar -> beam(3)"


def _tiny_sampler(tiny_lm, cfg):
    from llmsample import grammar
    from llmsample.sampling import Sampler

    _, tokenizer = tiny_lm
    return Sampler(cfg, state=grammar.bind(cfg, tokenizer, [tokenizer.eos_token_id]))


@pytest.mark.parametrize("prefix", ["", "ab", "abcd"])
def test_survivors_keep_their_unconstrained_probabilities_renormalised(tiny_lm, prefix):
    from llmsample.config import SamplingConfig

    _, tokenizer = tiny_lm
    cfg = SamplingConfig(do_sample=True, regex=r"(ab|cd)+e?")
    sampler = _tiny_sampler(tiny_lm, cfg)
    generated = tokenizer.encode(prefix, add_special_tokens=False)
    ids = torch.tensor([[1, 5, *generated]])
    logits = torch.randn(1, len(tokenizer), generator=torch.Generator().manual_seed(len(prefix))) * 3
    processed = sampler.process(ids, logits, prompt_len=2)
    allowed = sampler.state["grammar"].allowed(ids[:, 2:], logits.shape[-1])
    assert torch.equal(torch.isfinite(processed), allowed)
    raw = torch.softmax(logits, -1)
    expected = raw * allowed / (raw * allowed).sum()
    assert torch.allclose(torch.softmax(processed, -1), expected, atol=1e-6)
    # EOS only where the text may end: after a prefix that completes "(ab|cd)+"
    assert bool(allowed[0, tokenizer.eos_token_id]) == (prefix != "")
    # The cut mass is the raw mass of the forbidden tokens.
    choice = sampler.step(ids, logits, generator=torch.Generator().manual_seed(0), prompt_len=2)
    assert float(choice.record["grammar_cut"][0]) == pytest.approx(float(raw[~allowed].sum()), abs=1e-6)


def test_a_constraint_that_allows_everything_changes_nothing(cli, tiny_model_dir, tiny_lm, tmp_path):
    """Token for token the unconstrained run: the stage only removes what the grammar forbids."""
    _, tokenizer = tiny_lm
    everything = tmp_path / "all.lark"
    everything.write_text(f"start: <[0-{len(tokenizer) - 1}]>*\n")
    runs = []
    for extra in ((), ("--grammar", str(everything))):
        code, data, err = _run(cli, "Once", "-m", str(tiny_model_dir), "-n", "4", "--seed", "11", "--top-p", "0.95",
                               "--max-new-tokens", "40", *extra)
        assert code == 0, err
        runs.append(data)
    assert [s["token_ids"] for s in runs[0]["samples"]] == [s["token_ids"] for s in runs[1]["samples"]]
    assert [s["probs"] for s in runs[0]["samples"]] == [s["probs"] for s in runs[1]["samples"]]
    assert all(cut == 0 for s in runs[1]["samples"] for cut in s["grammar_cut"])


def test_a_run_that_ends_before_the_grammar_completes_says_so(cli, tiny_model_dir):
    code, data, err = _run(cli, "Hi", "-m", str(tiny_model_dir), "--regex", "[a-z]{40}", "--max-new-tokens", "3",
                           "--seed", "1")
    assert code == 0
    assert data["finish_reason"] == "length" and data["complete"] is False
    assert data["samples"][0]["complete"] is False
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "before the regex was complete" in warnings[0]


def test_candidate_tables_and_jsonl_show_the_cut(cli, tiny_model_dir):
    code, out, err = cli("Hi", "-m", str(tiny_model_dir), "--choice", "yes", "--choice", "no", "--candidates", "5",
                         "--seed", "1", "--format", "jsonl", "--stats")
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    tokens = [e for e in events if e["type"] == "token"]
    assert all(0.0 <= e["grammar_cut"] <= 1.0 for e in tokens)
    statuses = {c["removed_by"] for e in tokens for c in e["candidates"]["candidates"]}
    assert "grammar" in statuses
    stats = events[-1]["stats"]
    assert stats["grammar_cut_max"] == max(e["grammar_cut"] for e in tokens)
    assert "grammar cut" in err and "worst" in err
    code, out, err = cli("Hi", "-m", str(tiny_model_dir), "--choice", "yes", "--choice", "no", "--candidates", "5",
                         "--seed", "1")
    assert "cut by grammar" in err and "grammar cut" in err


@pytest.mark.parametrize("flags, message", [
    (("--json-schema", '{"type": "objekt"}'), "--json-schema: not a schema llguidance can follow: Invalid type"),
    (("--json-schema", '{"type": "object",}'), "--json-schema: not valid JSON: Expecting property name"),
    (("--json-schema", "missing.json"), "cannot read --json-schema file missing.json: No such file"),
    (("--regex", "a(b"), "--regex: 'a(b' is not a valid regular expression: unclosed group (at character 2)"),
    (("--regex", "a", "--choice", "b"), "--regex and --choice cannot be combined"),
    (("--grammar", "GBNF_BAD"), "not valid GBNF: Expected ')' (line 2, column 1)"),
    (("--grammar", "LARK_BAD"), "not a valid grammar: unknown name: \"nme\" (line 1, column 8)"),
])
def test_bad_constraints_are_one_line_exit_2_before_the_model_loads(cli, tmp_path, flags, message):
    if flags[0] == "--grammar":
        path = tmp_path / "bad.gbnf"
        path.write_text('root ::= ("a" | "b"\n' if flags[1] == "GBNF_BAD" else 'start: greeting nme\ngreeting: "hi"\n')
        flags = ("--grammar", str(path))
    code, out, err = cli("Hi", "-m", str(tmp_path / "no-such-model"), *flags)
    assert code == 2, err
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert message in err
    if flags[0] == "--grammar":
        assert str(flags[1]) in err  # the file is named


def test_a_grammar_no_token_can_start_is_exit_2(cli, tiny_model_dir):
    code, out, err = cli("Hi", "-m", str(tiny_model_dir), "--regex", r"[^\x00-\x{10FFFF}]")
    assert code == 2 and out == ""
    assert "no text this model's vocabulary can write satisfies it" in err


def test_presets_carry_a_constraint_and_the_command_line_replaces_it(cli, tiny_model_dir, tmp_path):
    preset = tmp_path / "answer.toml"
    preset.write_text('description = "yes or no"\n[constraint]\nchoice = ["yes", "no"]\n')
    code, data, err = _run(cli, "Hi", "-m", str(tiny_model_dir), "-p", str(preset), "--seed", "2")
    assert code == 0 and data["text"] in ("yes", "no")
    assert data["settings"]["choice"] == ["yes", "no"]
    code, data, err = _run(cli, "Hi", "-m", str(tiny_model_dir), "-p", str(preset), "--regex", "x+y", "--seed", "2")
    assert code == 0 and re.fullmatch("x+y", data["text"]) and data["settings"]["choice"] == []
    schema = tmp_path / "schema.toml"
    schema.write_text('[constraint.json_schema]\ntype = "object"\nrequired = ["a"]\nadditionalProperties = false\n'
                      '[constraint.json_schema.properties.a]\ntype = "boolean"\n')
    code, data, err = _run(cli, "Hi", "-m", str(tiny_model_dir), "-p", str(schema), "--seed", "2",
                           "--max-new-tokens", "60")
    assert code == 0, err
    assert isinstance(json.loads(data["text"])["a"], bool)
    both = tmp_path / "both.toml"
    both.write_text('[constraint]\nregex = "a"\nchoice = ["b"]\n')
    code, _, err = cli("Hi", "-m", str(tiny_model_dir), "-p", str(both))
    assert code == 2 and "cannot be combined" in err and "both" in err
    typo = tmp_path / "typo.toml"
    typo.write_text('[constraint]\nregx = "a"\n')
    code, _, err = cli("Hi", "-p", str(typo))
    assert code == 2 and "unknown key 'regx' (did you mean 'regex'?)" in err


def _sentencepiece_tokenizer():
    """A tiny tokenizer built the way Gemma's is: SentencePiece pieces ('▁' for a space) and byte fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in ("▁the", "▁", "t", "h", "e", "he", "▁a", "a", "{", "}"):
        vocab[piece] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("h", "e")], unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens(["<pad>", "<eos>", "<bos>"])

    class Wrapped:
        eos_token_id, bos_token_id = 1, 2

        def __init__(self):
            self.backend = backend

        def __len__(self):
            return backend.get_vocab_size()

        def encode(self, text, add_special_tokens=True):
            return backend.encode(text, add_special_tokens=False).ids

    return Wrapped(), vocab


def test_the_bridge_reads_sentencepiece_byte_fallback_and_caches_the_table(tmp_path, monkeypatch):
    from llmsample import grammar

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tokenizer, vocab = _sentencepiece_tokenizer()
    table = grammar.token_table(tokenizer, [1])
    assert table.decode_bytes([vocab["<0xE4>"]]) == b"\xe4"
    assert table.decode_bytes([vocab["▁the"]]) == b" the"
    assert len(list((tmp_path / "llmsample" / "grammar").glob("*.bin"))) == 1
    grammar._TABLES.clear()  # a new process: the table comes from the cache file
    again = grammar.token_table(tokenizer, [1])
    assert [again.decode_bytes([i]) for i in range(len(tokenizer))] == [
        table.decode_bytes([i]) for i in range(len(tokenizer))]
    # "é" is two bytes: only the byte-fallback token of its first byte can start it.
    constraint = grammar.Constraint("regex", "é", again)
    allowed = constraint.allowed(torch.zeros(1, 0, dtype=torch.long), len(tokenizer))[0]
    assert allowed.nonzero().flatten().tolist() == [vocab["<0xC3>"]]
    after = constraint.allowed(torch.tensor([[vocab["<0xC3>"]]]), len(tokenizer))[0]
    assert after.nonzero().flatten().tolist() == [vocab["<0xA9>"]]


def test_the_table_cache_is_keyed_by_the_tokenizer_file(tmp_path, monkeypatch):
    """A tokenizer that names its tokenizer.json is keyed by the file (path, size, mtime: no pass over the
    vocabulary); a changed file is another key; a damaged cache file is rebuilt; the table built from the cache
    encodes the texts a grammar forces with the model's tokenizer."""
    from llmsample import grammar

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(grammar, "_TABLES", {})
    tokenizer, vocab = _sentencepiece_tokenizer()
    source = tmp_path / "tokenizer.json"
    tokenizer.backend.save(str(source))
    tokenizer.source = source
    first = grammar.token_table(tokenizer, [1])
    expected = [first.decode_bytes([i]) for i in range(len(tokenizer))]
    folder = tmp_path / "cache" / "llmsample" / "grammar"
    (cached,) = folder.glob("*.bin")
    assert cached.name == f"{grammar._file_key(source)}.bin"

    grammar._TABLES.clear()  # a new process: the table comes from the cache file
    again = grammar.token_table(tokenizer, [1, 2])
    assert [again.decode_bytes([i]) for i in range(len(tokenizer))] == expected
    assert list(again.eos_tokens) == [1, 2]
    # A fixed text is forced as the tokenizer itself splits it: that calls the encoder.
    allowed = grammar.Constraint("regex", " the", again).allowed(torch.zeros(1, 0, dtype=torch.long),
                                                                len(tokenizer))[0]
    assert allowed.nonzero().flatten().tolist() == tokenizer.encode(" the")[:1] == [vocab["▁"]]

    cached.write_bytes(b"damaged")
    grammar._TABLES.clear()
    rebuilt = grammar.token_table(tokenizer, [1])
    assert [rebuilt.decode_bytes([i]) for i in range(len(tokenizer))] == expected
    assert grammar._read_table(cached) is not None  # written again
    os.utime(source, ns=(1, 1))  # a changed file: another key
    assert grammar._file_key(source) != cached.stem


def test_beams_that_swap_texts_take_their_parsers_along(tiny_lm):
    """Rows are matched to parsers by their tokens: a reordered batch gets the right masks."""
    from llmsample.config import SamplingConfig

    _, tokenizer = tiny_lm
    sampler = _tiny_sampler(tiny_lm, SamplingConfig(choice=("ab", "cd")))
    constraint = sampler.state["grammar"]
    a, c = (tokenizer.encode(t, add_special_tokens=False)[0] for t in ("a", "c"))
    first = constraint.allowed(torch.tensor([[a], [c]]), len(tokenizer))
    swapped = constraint.allowed(torch.tensor([[c], [a]]), len(tokenizer))
    assert torch.equal(first.flip(0), swapped)
    assert not torch.equal(first[0], first[1])


@pytest.mark.slow
def test_default_model_writes_valid_json_for_a_small_schema(cli):
    import jsonschema

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer", "minimum": 0,
                                                              "maximum": 99_999_999}},
              "required": ["city", "population"], "additionalProperties": False}
    texts = []
    for seed in range(4):
        code, data, err = _run(cli, "The largest city in France, as JSON:", "--json-schema", json.dumps(schema),
                               "-n", "5", "--seed", str(seed), "--max-new-tokens", "48", "--temperature", "0.8")
        assert code == 0, err
        texts += [s["text"] for s in data["samples"]]
    assert len(texts) == 20
    for text in texts:
        jsonschema.validate(json.loads(text), schema)


class _FixedMask:
    """A stand-in for a bound grammar: the same allowed set at every step."""

    def __init__(self, allowed):
        self.mask = allowed

    def allowed_bits(self, generated):
        from llmsample.sampling.constraint import pack

        return pack(self.mask)


@pytest.mark.parametrize("share", [0.0001, 0.6])  # few allowed: compacted rows; most allowed: dense rows
def test_wide_rows_compacted_or_not_are_the_unconstrained_ones_renormalised(share):
    from llmsample.config import SamplingConfig
    from llmsample.sampling import Sampler

    vocab = 262_144
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, vocab, generator=gen) * 3
    allowed = torch.rand(3, vocab, generator=gen) < share
    allowed[1] = False
    allowed[1, 17] = True  # one row with a single valid token
    sampler = Sampler(SamplingConfig(do_sample=True, regex="x", top_p=0.99), state={"grammar": _FixedMask(allowed)})
    plain = Sampler(SamplingConfig(do_sample=True, top_p=0.99))
    masked = torch.where(allowed, logits, float("-inf"))
    ids = torch.zeros(3, 1, dtype=torch.long)
    assert torch.equal(sampler.process(ids, logits), plain.process(ids, masked))
    choice = sampler.step(ids, logits, generator=torch.Generator().manual_seed(0))
    assert bool(allowed.gather(1, choice.token_ids.unsqueeze(1)).all())
    raw = torch.softmax(logits.double(), -1)
    assert torch.allclose(choice.record["grammar_cut"].double(), (raw * ~allowed).sum(-1), atol=1e-5)


@pytest.mark.parametrize("schema", [False, True, "false", " true "])
def test_a_boolean_schema_is_refused_with_a_clear_line(schema):
    """Found by the fuzz test: a boolean schema reached llguidance, which raised a bare ValueError."""
    from llmsample.config import SamplingConfig
    from llmsample.errors import ConfigError

    with pytest.raises(ConfigError, match=r"json_schema: the boolean schema (true|false) is not supported"):
        SamplingConfig(json_schema=schema)


def test_the_token_classes_kept_are_llguidances_own():
    """grammar.SLICES names two of llguidance's general slices by their text: a release that changes them would
    leave llmsample with classes that match no JSON string position (masks still right, but slow)."""
    import llguidance

    from llmsample import grammar

    assert set(grammar.SLICES) <= set(llguidance.LLTokenizer.general_slices())


def test_a_choice_skips_the_token_classes_free_text_needs(tiny_lm, monkeypatch):
    """--choice is a few fixed texts: its token table is built without llguidance's slices (0.2 s of set-up a run
    on the default model); a regex or schema, whose free text needs them, keeps them."""
    from llmsample import grammar
    from llmsample.config import SamplingConfig

    _, tokenizer = tiny_lm
    asked = []
    plain = grammar.token_table
    monkeypatch.setattr(grammar, "token_table", lambda tok, eos, slices=grammar.SLICES: (
        asked.append(tuple(slices)), plain(tok, eos, slices))[1])
    for constraint in ({"choice": ("yes", "no")}, {"regex": "[a-c]{2,4}"}):
        grammar.bind(SamplingConfig(do_sample=True, **constraint), tokenizer, [tokenizer.eos_token_id])
    assert asked == [(), grammar.SLICES]


def test_a_shorter_compacted_row_is_padded_with_ids_it_does_not_allow():
    """Rows of a batch allow different numbers of tokens; the shorter row's padding must not repeat an id it holds
    (token 0 here), or the dense row would lose that token's logit."""
    from llmsample.sampling.candidates import Candidates
    from llmsample.sampling.constraint import constrain, pack
    from llmsample.sampling.stages import History

    width = 4_096
    allowed = torch.zeros(2, width, dtype=torch.bool)
    allowed[0, [0, 5]] = True
    allowed[1, [3, 7, 9, 11]] = True
    logits = torch.randn(2, width, generator=torch.Generator().manual_seed(3))
    out = constrain(Candidates.from_logits(logits), History(torch.zeros(2, 0, dtype=torch.long)), pack(allowed))
    assert not out.is_dense and all(row.unique().numel() == row.numel() for row in out.ids)
    assert torch.equal(out.dense().isfinite(), allowed)
    assert torch.equal(out.dense()[allowed], logits[allowed])

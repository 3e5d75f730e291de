"""TOML presets: the built-ins, the schema, precedence, extends, user overrides, the schedule, and every error."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest

from llmsample import presets
from llmsample.config import ScheduleEntry

BUILTINS = ["balanced", "beam", "creative", "dialogue", "fresh", "greedy", "longform", "poetry", "qa", "technical"]


@pytest.fixture(autouse=True)
def user_config(tmp_path, monkeypatch) -> Path:
    """Every test gets its own empty user preset folder."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path / "config" / "llmsample" / "presets"


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


# ---- the built-ins ---------------------------------------------------------------------------------------------


def test_the_builtins_are_there_and_each_validates_with_a_description_and_the_default_order():
    assert sorted(presets.available()) == BUILTINS
    for name in BUILTINS:
        data = presets.read(presets.find(name))
        assert data["description"] and "seed" not in data["description"]  # says what it is for, no jargon
        assert "seed 00" in data["source"] or "llama.cpp" in data["source"]  # cites its numbers' source
        settings = presets.resolve_settings(name)
        # No built-in pins an order: a new stage joins every preset's chain in its registry place.
        assert settings.sources["sampling.order"] == "default"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("technical", dict(temperature=0.3, top_k=20, top_p=0.8, repetition_penalty=1.3)),
        ("dialogue", dict(temperature=0.7, top_k=50, top_p=0.95, length_penalty=0.9)),
        ("poetry", dict(temperature=1.5, top_k=200, top_p=0.99, repetition_penalty=1.0)),
        ("balanced", dict(temperature=0.8, top_k=50, top_p=0.9)),
        ("creative", dict(temperature=1.2, top_k=100, top_p=0.99)),
        ("qa", dict(top_p=0.75, top_k=0)),
        ("greedy", dict(do_sample=False)),
        ("beam", dict(do_sample=False, num_beams=4, length_penalty=1.0)),
    ],
)
def test_seed_values_are_pinned(name, expected):
    cfg = presets.resolve_settings(name).sampling
    assert {key: getattr(cfg, key) for key in expected} == expected


def test_dialogue_length_penalty_is_marked_inactive():
    notes = dict(presets.resolve_settings("dialogue").inactive())
    assert notes["sampling.length_penalty"] == "applies to beam search only (num_beams > 1)"


def test_longform_extends_balanced_and_carries_seed_000s_schedule():
    settings = presets.resolve_settings("longform")
    assert settings.sampling.top_k == 50 and settings.sources["sampling.top_k"] == "preset balanced"
    assert settings.generation.max_new_tokens == 512 and settings.sources["generation.max_new_tokens"] == "preset longform"
    assert settings.schedule == (ScheduleEntry(0, 1.0), ScheduleEntry(64, 0.6))


# ---- precedence ------------------------------------------------------------------------------------------------


def test_precedence_defaults_then_preset_then_command_line():
    settings = presets.resolve_settings("technical", {"sampling": {"top_p": 0.5}, "generation": {"seed": 3}})
    assert settings.sampling.top_p == 0.5 and settings.sources["sampling.top_p"] == "command line"
    assert settings.sampling.top_k == 20 and settings.sources["sampling.top_k"] == "preset technical"
    assert settings.sampling.min_p == 0.0 and settings.sources["sampling.min_p"] == "default"
    assert settings.generation.seed == 3 and settings.sources["generation.seed"] == "command line"


def test_a_command_line_temperature_replaces_a_schedule():
    settings = presets.resolve_settings("longform", {"sampling": {"temperature": 0.5}})
    assert settings.schedule == () and settings.sources["schedule"] == "command line"


def test_a_user_preset_overrides_the_builtin_and_list_says_so(cli, user_config):
    write(user_config, "technical", 'description = "mine"\n[sampling]\ntemperature = 0.1\n')
    assert presets.resolve_settings("technical").sampling.temperature == 0.1
    code, out, _ = cli("presets", "list")
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("technical"))
    assert "user (overrides built-in)" in line and "mine" in line


def test_preset_by_path(tmp_path):
    path = write(tmp_path, "mine", "extends = \"poetry\"\n[sampling]\ntop_k = 10\n")
    settings = presets.resolve_settings(str(path))
    assert settings.sampling.top_k == 10 and settings.sampling.temperature == 1.5


# ---- errors: each names the file and the key, and the command line exits 2 --------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("[sampling]\ntemperature = \n", "not valid TOML: Invalid value (at line 2, column 15)"),
        ("[sampling]\ntempreature = 0.5\n", "[sampling]: unknown key 'tempreature' (did you mean 'temperature'?)"),
        ("[generation]\nmax_tokens = 5\n", "[generation]: unknown key 'max_tokens' (did you mean 'max_new_tokens'?)"),
        ("descripton = \"x\"\n", "unknown key 'descripton' (did you mean 'description'?)"),
        ("[sampling]\ntop_p = 1.5\n", "preset bad: sampling.top_p must be in (0, 1], got 1.5"),
        ("[sampling]\ntop_k = \"many\"\n", "preset bad: sampling.top_k must be an integer >= 0, got 'many'"),
        ("[sampling]\ndo_sample = 1\n", "preset bad: sampling.do_sample must be true or false, got 1"),
        ("[sampling]\norder = [\"top_k\", \"top_k\"]\n", "sampling.order names the stage 'top_k' twice"),
        ("[generation]\nstop = \"\\n\"\n", "generation.stop must be a list of strings"),
        ("extends = \"nope\"\n", "extends: unknown preset 'nope'"),
        ("[[schedule]]\nfrom_token = 5\n", "schedule[0] needs temperature"),
        ("[[schedule]]\nfrom_token = 5\ntemperature = -1\n", "schedule[0].temperature must be in [0, inf), got -1"),
        ("[[schedule]]\nfrom_token = 0\ntemp = 1\n", "schedule[0]: unknown key 'temp'"),
        ("[sampling]\nnum_beams = 3\ndo_sample = true\n", "num_beams=3 needs do_sample=false"),
    ],
)
def test_bad_preset_files_name_file_key_and_range(cli, tmp_path, text, message):
    path = write(tmp_path, "bad", text)
    with pytest.raises(presets.ConfigError) as info:
        presets.resolve_settings(str(path))
    assert message in str(info.value)
    assert str(path) in str(info.value) or "preset bad" in str(info.value)
    code, out, err = cli("presets", "show", str(path))
    assert code == 2 and out == "" and message in err and err.count("\n") == 1


def test_extends_cycle_is_an_error(user_config):
    write(user_config, "a", 'extends = "b"\n')
    write(user_config, "b", 'extends = "a"\n')
    with pytest.raises(presets.ConfigError, match="extends makes a cycle: a -> b -> a"):
        presets.resolve_settings("a")


def test_unknown_preset_suggests_and_lists(cli):
    code, _, err = cli("presets", "show", "poetri")
    assert code == 2 and "unknown preset 'poetri' (did you mean 'poetry'?)" in err and "technical" in err


def test_a_preset_that_is_not_utf8_or_not_there(tmp_path):
    path = tmp_path / "latin.toml"
    path.write_bytes(b'description = "caf\xe9"\n')
    with pytest.raises(presets.ConfigError, match="not valid UTF-8 at byte offset 18"):
        presets.resolve_settings(str(path))
    with pytest.raises(presets.ConfigError, match="preset file not found"):
        presets.resolve_settings(str(tmp_path / "missing.toml"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_preset(tmp_path):
    path = write(tmp_path, "locked", "")
    path.chmod(0)
    with pytest.raises(presets.ConfigError, match="cannot read"):
        presets.resolve_settings(str(path))


# ---- commands --------------------------------------------------------------------------------------------------


def test_show_marks_inactive_and_prints_the_chain(cli):
    code, out, _ = cli("presets", "show", "dialogue")
    assert code == 0
    cells = " ".join(part.strip() for line in out.splitlines() for part in line.split("│"))  # 80-column table
    assert "length_penalty" in cells and "inactive:" in cells and "beam search only" in " ".join(cells.split())
    assert "chain: logits -> top_k -> top_p -> temperature -> dist" in out
    code, out, _ = cli("presets", "show", "technical", "--format", "json")
    data = json.loads(out)
    assert data["settings"]["sampling.top_k"] == {"value": 20, "from": "preset technical"}
    assert data["chain"] == "logits -> penalties -> top_k -> top_p -> temperature -> dist"


def test_diff_lists_only_what_differs(cli):
    code, out, _ = cli("presets", "diff", "technical", "poetry")
    assert code == 0
    assert "sampling.temperature" in out and "0.3" in out and "1.5" in out
    assert "sampling.min_p" not in out
    assert "resolve to the same settings" in cli("presets", "diff", "balanced", "balanced")[1]


def test_new_round_trips_through_show_and_refuses_to_overwrite(cli, user_config):
    code, out, _ = cli("presets", "new", "mine", "--from", "longform")
    path = Path(out.strip())
    assert code == 0 and path == user_config / "mine.toml"
    assert "# top_p" not in path.read_text() and "top_p = 0.9  # (0, 1]" in path.read_text()
    ours = [(k, v) for k, v, _ in presets.resolve_settings("mine").rows()]
    theirs = [(k, v) for k, v, _ in presets.resolve_settings("longform").rows()]
    assert ours == theirs
    code, _, err = cli("presets", "new", "mine")
    assert code == 2 and "already exists (use --force to overwrite it)" in err
    assert cli("presets", "new", "mine", "--force")[0] == 0
    assert presets.resolve_settings("mine").sampling.top_k == 0  # now from the defaults


@pytest.mark.parametrize("name", ['my"style', 'a\nextends = "poetry"', "a" * 300, "", "../up", ".hidden", "x.toml",
                                  "tab\there", "naïve"])
def test_new_takes_only_plain_names(cli, user_config, name):
    code, out, err = cli("presets", "new", name)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "a preset name is 1 to 64 letters, digits, '-' or '_'" in err
    assert not user_config.exists() or not list(user_config.iterdir())


def test_new_writes_its_values_through_a_toml_writer(cli, user_config, tmp_path):
    odd = ['say "hi"', "line\nbreak", "back\\slash", "bell\x07", "tab\t"]
    base = write(tmp_path, "odd", f"[generation]\nstop = {json.dumps(odd)}\n")
    code, out, err = cli("presets", "new", "odd-copy", "--from", str(base))
    assert code == 0, err
    assert presets.resolve_settings("odd-copy").generation.stop == tuple(odd)
    assert cli("presets", "list")[0] == 0


def test_list_skips_a_broken_user_preset_and_names_it(cli, user_config):
    broken = write(user_config, "broken", 'description = "unterminated\n')
    write(user_config, "fine", 'description = "still listed"\n')
    code, out, err = cli("presets", "list")
    assert code == 0
    assert "broken" not in out and "still listed" in out and "technical" in out
    assert f"warning: skipped the user preset 'broken': {broken}: not valid TOML" in err


@pytest.mark.parametrize("dangling", [True, False])
def test_new_replaces_a_symlink_instead_of_writing_through_it(cli, user_config, tmp_path, dangling):
    victim = tmp_path / "victim.txt"
    if not dangling:
        victim.write_text("precious")
    user_config.mkdir(parents=True)
    (user_config / "link.toml").symlink_to(victim)
    code, _, err = cli("presets", "new", "link")
    assert code == 2 and "already exists (use --force to overwrite it)" in err
    assert cli("presets", "new", "link", "--force")[0] == 0
    assert not (user_config / "link.toml").is_symlink()
    assert presets.resolve_settings("link").sampling.top_k == 0
    assert (victim.read_text() == "precious") if not dangling else not victim.exists()
    assert sorted(p.name for p in user_config.iterdir()) == ["link.toml"]  # no temporary file left


def test_new_where_the_config_folder_is_a_file(cli, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(blocker))
    code, out, err = cli("presets", "new", "mine")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"cannot write the preset {blocker}/llmsample/presets/mine.toml: Not a directory" in err


def test_arrays_nested_too_deeply_are_a_preset_error(cli, tmp_path):
    path = write(tmp_path, "deep", "[generation]\nstop = " + "[" * 900 + "]" * 900 + "\n")
    code, out, err = cli("presets", "show", str(path))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"{path}: not valid TOML here: arrays or tables nested too deeply" in err


# ---- in a run --------------------------------------------------------------------------------------------------


def test_generate_with_a_schedule_reports_the_temperature_of_each_step(cli, tiny_model_dir, tmp_path):
    path = write(tmp_path, "sched", '[sampling]\ntop_k = 30\n[[schedule]]\nfrom_token = 0\ntemperature = 1.0\n'
                                    '[[schedule]]\nfrom_token = 3\ntemperature = 0.6\n')
    code, out, err = cli("The quick", "--model", str(tiny_model_dir), "--device", "cpu", "--preset", str(path),
                         "--max-new-tokens", "6", "--ignore-eos", "--seed", "1", "--format", "json")
    assert code == 0, err
    result = json.loads(out)
    assert result["samples"][0]["temperatures"] == [1.0, 1.0, 1.0, 0.6, 0.6, 0.6]
    assert result["settings"]["schedule"] == [[0, 1.0], [3, 0.6]]


def test_generate_explain_prints_sources_and_chain_to_stderr(cli, tiny_model_dir):
    code, out, err = cli("The quick", "--model", str(tiny_model_dir), "--device", "cpu", "--preset", "dialogue",
                         "--top-k", "10", "--explain", "--max-new-tokens", "2", "--format", "json")
    assert code == 0
    assert json.loads(out)["settings"]["top_k"] == 10  # stdout is only the answer
    assert "command line" in err and "preset dialogue" in err
    assert "chain: logits -> top_k -> top_p -> temperature -> dist" in err
    # The built-in preset's length_penalty is inactive: --explain shows it, no warning (tests/test_model_defaults).
    assert "warning" not in err and "inactive" in err


def test_greedy_preset_with_sampling_flags_warns(cli, tiny_model_dir):
    code, _, err = cli("The quick", "--model", str(tiny_model_dir), "--device", "cpu", "--preset", "greedy",
                       "--top-p", "0.5", "--max-new-tokens", "2")
    assert code == 0 and "warning: top_p=0.5 has no effect: no effect with greedy decoding" in err


@pytest.mark.parametrize("argv", [["presets", "list"], ["--help"], ["generate", "--help"], ["presets", "show", "poetry"]])
def test_help_and_presets_do_not_import_torch(argv):
    import subprocess
    import sys

    code = (f"import sys; from llmsample.cli import main; main({argv!r}); "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(argv)} imported torch"


@pytest.mark.slow
def test_the_wheel_ships_the_presets_and_the_man_page(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(root)],
                   check=True)
    wheel = next(tmp_path.glob("llmsample-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for preset in BUILTINS:
        assert f"llmsample/presets/{preset}.toml" in names
    assert any(name.endswith("share/man/man1/llmsample.1") for name in names)

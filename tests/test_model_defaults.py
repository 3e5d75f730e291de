"""The model layer (a model's own generation_config.json values) and which inactive settings are warned about."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmsample import presets
from llmsample.errors import ConfigError
from llmsample.model_defaults import PACKAGED_MODEL_DEFAULTS, from_generation_config, sampling_defaults


@pytest.fixture
def model_with_defaults(tiny_model_dir, tmp_path) -> Path:
    """The tiny model with a generation_config.json that recommends top_k 7 and temperature 0.5."""
    folder = tmp_path / "tiny-with-defaults"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "generation_config.json").read_text()) if (
        folder / "generation_config.json").is_file() else {}
    config.update({"do_sample": True, "top_k": 7, "temperature": 0.5, "max_length": 20, "top_p": None})
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


def test_a_generation_config_maps_onto_the_sampling_fields_it_names():
    data = {"do_sample": True, "top_k": 64, "top_p": 0.95, "repetition_penalty": 1.1, "eos_token_id": [1, 106],
            "max_length": 20, "cache_implementation": "hybrid", "temperature": None, "order": "hf"}
    # Only sampling fields, only those present (None is transformers' "unset"), never a stage order.
    assert from_generation_config(data, "x") == {"do_sample": True, "top_k": 64, "top_p": 0.95,
                                                 "repetition_penalty": 1.1}


def test_a_bad_value_in_a_generation_config_names_the_file_and_the_way_out():
    with pytest.raises(ConfigError, match=r"^m/generation_config.json: top_p must be in \(0, 1\], got 1.5 "
                                          r"\(--no-model-defaults ignores"):
        from_generation_config({"top_p": 1.5}, "m/generation_config.json")


def test_where_the_model_layer_comes_from(model_with_defaults, tiny_model_dir, tmp_path):
    assert sampling_defaults(None) == PACKAGED_MODEL_DEFAULTS == {"do_sample": True, "top_k": 64, "top_p": 0.95}
    assert sampling_defaults(str(model_with_defaults)) == {"do_sample": True, "top_k": 7, "temperature": 0.5}
    bare = tmp_path / "bare"
    bare.mkdir()
    assert sampling_defaults(str(bare)) == {}  # no generation_config.json: no layer
    assert sampling_defaults(str(tmp_path / "x.gguf")) == {}  # GGUF metadata carries no sampling values


def test_precedence_is_defaults_then_model_then_preset_then_command_line():
    model = {"top_k": 64, "top_p": 0.95, "temperature": 0.5}
    settings = presets.resolve_settings("qa", {"sampling": {"temperature": 0.9}}, model)
    assert settings.sampling.top_k == 64 and settings.sources["sampling.top_k"] == "model"  # qa sets no top_k
    assert settings.sampling.top_p == 0.75 and settings.sources["sampling.top_p"] == "preset qa"
    assert settings.sampling.temperature == 0.9 and settings.sources["sampling.temperature"] == "command line"
    assert settings.sources["sampling.min_p"] == "default"


def test_explain_shows_the_model_layer_and_no_model_defaults_removes_it(cli, model_with_defaults):
    args = ["The quick", "--model", str(model_with_defaults), "--device", "cpu", "--max-new-tokens", "2",
            "--explain", "--no-color", "--format", "json"]
    code, out, err = cli(*args)
    assert code == 0, err
    assert json.loads(out)["settings"]["top_k"] == 7
    assert "chain: logits -> top_k -> temperature -> dist" in err
    assert any(line.split()[:3] == ["top_k", "7", "model"] for line in err.replace("│", " ").splitlines())
    code, out, err = cli(*args, "--no-model-defaults")
    assert code == 0, err
    assert json.loads(out)["settings"]["top_k"] == 0 and "chain: logits -> dist" in err


def test_presets_show_names_the_packaged_models_values(cli):
    code, out, _ = cli("presets", "show", "balanced", "--format", "json")
    settings = json.loads(out)["settings"]
    assert settings["sampling.top_k"] == {"value": 50, "from": "preset balanced"}  # the preset wins
    code, out, _ = cli("presets", "show", "greedy", "--format", "json")
    settings = json.loads(out)["settings"]
    assert settings["sampling.top_p"]["from"] == "model" and "inactive" in settings["sampling.top_p"]
    code, out, _ = cli("presets", "show", "greedy", "--format", "json", "--no-model-defaults")
    assert json.loads(out)["settings"]["sampling.top_p"] == {"value": 1.0, "from": "default"}


# ---- which inactive settings are warned about ---------------------------------------------------------------


def test_a_built_in_presets_inactive_value_is_shown_not_warned(cli, tiny_model_dir):
    code, _, err = cli("The quick", "--model", str(tiny_model_dir), "--device", "cpu", "--preset", "dialogue",
                       "--max-new-tokens", "2", "--explain", "--no-color")
    assert code == 0, err
    assert "warning" not in err
    assert "inactive: applies to beam search only" in " ".join(err.replace("│", " ").split())


def test_the_models_inactive_values_are_not_warned_about(cli, model_with_defaults):
    code, _, err = cli("The quick", "--model", str(model_with_defaults), "--device", "cpu", "--greedy",
                       "--max-new-tokens", "2")
    assert code == 0 and "warning" not in err, err


@pytest.mark.parametrize("where", ["command line", "user preset", "preset file"])
def test_the_users_own_inactive_value_still_warns(cli, tiny_model_dir, tmp_path, monkeypatch, where):
    args = ["The quick", "--model", str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", "2"]
    text = 'extends = "dialogue"\n[sampling]\nlength_penalty = 0.8\n'
    if where == "command line":
        args += ["--preset", "dialogue", "--length-penalty", "0.8"]
    elif where == "user preset":
        folder = Path(tmp_path / "config")
        monkeypatch.setenv("XDG_CONFIG_HOME", str(folder))
        (folder / "llmsample" / "presets").mkdir(parents=True)
        (folder / "llmsample" / "presets" / "mine.toml").write_text(text)
        args += ["--preset", "mine"]
    else:
        (tmp_path / "mine.toml").write_text(text)
        args += ["--preset", str(tmp_path / "mine.toml")]
    code, _, err = cli(*args)
    assert code == 0, err
    assert "warning: length_penalty=0.8 has no effect: applies to beam search only" in err

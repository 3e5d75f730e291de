"""Nothing foreign runs: a model folder's own Python never does, whatever stdin says."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EVIL_CODE = '''
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = {model_type!r}
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
'''


def evil_folder(tiny_model_dir: Path, where: Path, model_type: str) -> tuple[Path, Path]:
    """The tiny model with a config.json whose auto_map names code in the folder; the code leaves a marker file."""
    folder, marker = where / f"evil-{model_type}", where / f"ran-{model_type}"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig",
                                                   "AutoModelForCausalLM": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(EVIL_CODE.format(marker=str(marker), model_type=model_type))
    return folder, marker


def run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path / "cache"),
                   "XDG_CONFIG_HOME": str(tmp_path / "config"), **env}
    return subprocess.run([sys.executable, "-m", "llmsample", *args], input=b"y\ny\ny\n", capture_output=True,
                          env=environment, timeout=120)


@pytest.mark.parametrize("command", [
    ["inspect", "Hi"],
    ["sweep", "Hi", "--grid", "top_p=0.5", "--samples", "1", "--max-new-tokens", "1"],
    ["generate", "-f", "PROMPT_FILE"],
    ["generate", "Hi", "--engine", "transformers"],
    ["generate", "Hi", "--via-env"],
])
def test_a_folder_that_needs_its_own_code_is_refused_and_its_code_never_runs(tmp_path, tiny_model_dir, command):
    folder, marker = evil_folder(tiny_model_dir, tmp_path, "evil_llama")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Hi")
    args = [str(prompt) if a == "PROMPT_FILE" else a for a in command if a != "--via-env"]
    env = {"LLMSAMPLE_MODEL": str(folder)} if "--via-env" in command else {}
    result = run(args + ([] if env else ["--model", str(folder)]), tmp_path, **env)
    err = result.stderr.decode()
    assert not marker.exists(), "the model folder's code ran"
    assert result.returncode == 3 and result.stdout == b"", err
    assert err == (f"llmsample: error: {folder} needs custom code (its own Python files, named by auto_map in its "
                   "config), which llmsample does not run\n")


def test_a_known_architecture_loads_without_running_the_folders_code(tmp_path, tiny_model_dir):
    folder, marker = evil_folder(tiny_model_dir, tmp_path, "llama")  # auto_map, but transformers knows llama
    result = run(["Hi", "--model", str(folder), "--max-new-tokens", "2", "--format", "json"], tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    assert not marker.exists()
    assert json.loads(result.stdout)["model"] == str(folder)

"""Shell completion, exercised in a real bash."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.skipif(not shutil.which("bash") or not (BIN / "llmsample").exists(), reason="needs bash and the script")
@pytest.mark.parametrize(
    "words, cword, expected",
    [
        ("llmsample pres", 1, {"presets"}),
        ("llmsample generate --top", 2, {"--top-k", "--top-p"}),
        ("llmsample presets s", 2, {"show"}),
        ("llmsample generate --dtype b", 3, {"bfloat16"}),
        ("llmsample expl", 1, {"explore"}),
        ("llmsample explore --top", 2, {"--top-k", "--top-p"}),
        ("llmsample explore --for", 2, {"--format", "--force"}),
        ("llmsample generate --for", 2, {"--force"}),
        ("llmsample rep", 1, {"replay"}),
        ("llmsample replay --tol", 2, {"--tolerance"}),
        ("llmsample replay --quantize i", 3, {"int8"}),
    ],
)
def test_bash_completion(words, cword, expected):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    shown = subprocess.run(["llmsample", "--show-completion", "bash"], capture_output=True, text=True, env=env)
    assert shown.returncode == 0, shown.stderr
    script = shown.stdout
    assert "complete -o default -F _llmsample_completion llmsample" in script
    program = (f"{script}\nCOMP_WORDS=({words}); COMP_CWORD={cword}; _llmsample_completion llmsample\n"
               'printf "%s\\n" "${COMPREPLY[@]}"')
    result = subprocess.run(["bash", "-c", program], capture_output=True, text=True, env=env, stdin=subprocess.PIPE)
    assert expected <= set(result.stdout.split()), result.stdout + result.stderr

"""Every command the README shows runs (on the tiny model, through LLMSAMPLE_MODEL), so the README cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    body = README.split("## Quick start", 1)[1].split("\n## ", 1)[1]  # the Quick start itself is CI's own job
    blocks = re.findall(r"```sh\n(.*?)```", body, flags=re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if re.match(r"(echo .*\| )?llmsample ", line)]


def test_the_readme_shows_commands():
    assert len(readme_commands()) >= 12


@pytest.mark.slow
@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs(command, tiny_model_dir, tmp_path):
    env = {**os.environ, "LLMSAMPLE_MODEL": str(tiny_model_dir), "XDG_CONFIG_HOME": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr

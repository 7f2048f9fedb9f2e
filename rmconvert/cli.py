"""The ``rmconvert`` command. Turns rmconvert's errors into one line on stderr and an exit code."""

from __future__ import annotations

import functools
import json
import signal
import sys
import threading
import time
from pathlib import Path

import click

from . import __version__
from .errors import ExitCode, RMConvertError, UsageError


class Failure(click.ClickException):
    """An rmconvert error at the CLI edge: ``rmconvert: error: <file>: <problem>``."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"rmconvert: error: {self.format_message()}", err=True)


def reports_errors(command):
    """Map RMConvertError and interrupts raised by ``command`` to messages and exit codes."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UsageError as exc:
            raise click.UsageError(str(exc)) from None
        except RMConvertError as exc:
            raise Failure(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            raise Failure("interrupted; nothing was written", ExitCode.INTERRUPTED) from None

    return wrapper


class ByteBar:
    """``on_bytes(done, total)`` drawn as a bar on a terminal, redrawn at most ten times a second (workers
    call it from their threads)."""

    WIDTH = 30

    def __init__(self, stream):
        self.stream, self.lock, self.last, self.drawn = stream, threading.Lock(), 0.0, False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        with self.lock:
            if done < total and now - self.last < 0.1:
                return
            self.last, self.drawn = now, True
            part = min(done / total, 1.0) if total else 1.0
            filled = round(part * self.WIDTH)
            mib = lambda n: f"{n / 2**20:,.1f}"
            self.stream.write(
                f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {part:4.0%} {mib(min(done, total))}/{mib(total)} MiB"
            )
            self.stream.flush()

    def close(self) -> None:
        """End the bar's line, so that what follows starts on a line of its own."""
        with self.lock:
            if self.drawn:
                self.stream.write("\n")
                self.stream.flush()
                self.drawn = False


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rmconvert")
def cli():
    """Turn causal-LM checkpoints into reward models, and check that reward models are sound."""


@cli.command()
@click.argument("src", type=click.Path(path_type=str))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option(
    "--revision",
    metavar="REV",
    help="When SRC is a Hugging Face repo id (org/name): its branch, tag or commit. Default: main.",
)
@click.option(
    "--arch", default="auto", show_default=True, help="Architecture plugin; auto reads config.json model_type."
)
@click.option(
    "--head",
    type=click.Choice(["scalar", "bt", "prm", "value"]),
    default="scalar",
    show_default=True,
    help="scalar: 1 label (TRL, open-instruct). bt: 2 labels [zeros; w] (HALOs Bradley-Terry). prm: a process"
    " reward model, <Family>ForTokenClassification with 2 labels (TRL PRMTrainer; LABEL_1 = correct step)."
    " value: a value model / critic, <Family>ForTokenClassification with 1 label (verl, OpenRLHF, open-instruct),"
    " whose score at the last token is the source reward model's reward; its pad is --pad-token existing's.",
)
@click.option(
    "--step-separator",
    metavar="TEXT",
    help="With --head prm or value: the step tag a PRM is read at (TRL PRMTrainer's step_separator), recorded as"
    " config.json step_tag_id; it must be one token of the vocabulary, not the pad or an eos.",
)
@click.option(
    "--pad-token",
    default="auto",
    show_default=True,
    metavar="auto|eos|keep|existing|TOKEN",
    help="auto: a pad distinct from every eos (kept for an existing reward model). eos: pad = eos,"
    " as HALOs does (moves where rewards are read). keep: leave as is. existing: a token already in the"
    " tokenizer, never an eos, so the vocabulary stays the policy's (value models in TRL, open-instruct)."
    " TOKEN: that token.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of a new head's initialisation.")
@click.option("--init-std", type=float, help="Std of a new head (default 1/sqrt(hidden_size + 1), as open-instruct).")
@click.option(
    "--from-bt",
    type=click.Choice(["row1", "difference"]),
    default="row1",
    show_default=True,
    help="2-label source to scalar: row1 (HALOs trains only row 1) or row 1 - row 0 (softmax classifiers).",
)
@click.option(
    "--label-names",
    metavar="NAME,...",
    help="Names of the head's rows, written as id2label (default: the names the source config carries, else"
    " LABEL_i). As many as the output head has rows.",
)
@click.option(
    "--objective",
    metavar="NAME|k",
    help="A multi-objective head (N rows, ArmoRM/QRM, HelpSteer-style): write only objective k (0-based) or NAME"
    " as a 1-label reward model (QRM: the mean of its quantile rows).",
)
@click.option(
    "--weights",
    metavar="c1,...,cN",
    help="Collapse an N-row linear head into one row sum(c_i * row_i), in float64 rounded once (e.g. Nemotron-4"
    " 340B's 0,0,0,0,.3,.74,.46,.47,-.33). Refused on gated heads (ArmoRM, QRM), whose weights depend on the prompt.",
)
@click.option(
    "--head-from-tokens",
    metavar="TOKEN[,TOKEN...]",
    help="Make score from a causal LM's LM-head rows (the embedding's when tied): two tokens no,yes give"
    " row[yes] - row[no] (a yes/no GenRM: sigmoid of the reward = P(yes)), one or more than two the rows"
    " themselves; with --head prm exactly two, NEG,POS, kept as the rows lm_head[[NEG, POS]] (an lm-head PRM such as"
    " math-shepherd; bias 0); with --head value one token or two (their difference). A TOKEN is a vocabulary entry"
    " exactly (case-sensitive), text that is one token, or an id.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    help="Cast float tensors (streamed in bounded chunks). Default: keep the source's dtypes.",
)
@click.option(
    "--max-shard-size",
    metavar="SIZE",
    help="Re-shard into files of at most SIZE (e.g. 5GB, 500MiB). Default: keep the source's shard layout.",
)
@click.option(
    "--link",
    is_flag=True,
    help="Reflink, or else hard-link, shards that need no change instead of copying them. A hard link"
    " shares the source's inode: writing to either file changes both, and the file keeps the source's"
    " permissions. Output bytes are the same as without --link.",
)
@click.option(
    "--portable",
    is_flag=True,
    help="For a family transformers has no sequence-classification class for, also write that class into DST"
    " (modeling_rmconvert.py + auto_map), so consumers without rmconvert load it with trust_remote_code=True."
    " Default: no code in the checkpoint; load it with rmconvert.load_reward_model.",
)
@click.option(
    "--text-only",
    is_flag=True,
    help="For a vision-language model: drop the vision tower and projector and write a text reward model of its"
    " language model's family (Qwen3.5 -> qwen3_5_text, Gemma 3 -> gemma3_text, LLaVA -> llama, InternVL -> qwen2).",
)
@click.option(
    "--no-source-hashes",
    "hash_sources",
    flag_value=False,
    default=True,
    help="Do not record the sha256 of every source file in rmconvert.json. Hashing runs beside the copy on"
    " the second core but reads every byte (about 1.7 GB/s a core); files of a Hugging Face cache are free.",
)
@click.option(
    "--adapter",
    type=click.Path(path_type=Path),
    metavar="ADAPTER",
    help="A PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors or .bin) to merge into SRC,"
    " exactly as PEFT's merge_and_unload() does, tensor by tensor. SRC may also be the adapter itself when its"
    " base_model_name_or_path names a local directory or a Hub repo id.",
)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty DST (only once the new one is complete).")
@click.option("--json", "as_json", is_flag=True, help="Print only a JSON report on stdout.")
@reports_errors
def convert(src, dst, overwrite, link, adapter, as_json, **options):
    """Convert the checkpoint SRC into a reward-model checkpoint DST.

    SRC is a checkpoint directory or a Hugging Face repo id (org/name): from the cache when HF_HUB_OFFLINE=1,
    else downloading only the files a conversion reads. Unchanged tensors are copied as bytes; the model is
    never loaded. SRC is never written, and DST appears only when complete.
    """
    from .engine import convert as run

    given = click.get_current_context().get_parameter_source("from_bt")
    if options["head"] == "prm" and given is not click.core.ParameterSource.DEFAULT:
        raise UsageError("--from-bt chooses how a 2-label head becomes 1 label; --head prm keeps 2 labels")

    bar = ByteBar(sys.stderr) if not as_json and sys.stderr.isatty() else None
    lines = None if as_json or bar else lambda msg: click.echo(msg, err=True)
    try:
        report = run(src, dst, overwrite=overwrite, link=link, adapter=adapter, progress=lines, on_bytes=bar, **options)
    finally:
        if bar:
            bar.close()
    if as_json:
        _echo_json(report)
        return
    for warning in report["warnings"]:
        click.echo(f"rmconvert: warning: {warning}", err=True)
    head, pad, vocab = report["head"], report["pad"], report["vocab"]
    click.echo(
        f"{report['destination']}: {report['class']} with a {head['labels']}-label head ({head['how']});"
        f" pad {pad['token']!r} = {pad['id']} ({pad['action']}: {pad['reason']}); vocab {vocab['from']} ->"
        f" {vocab['to']}",
        err=True,
    )
    if "adapter" in report:
        merged = report["adapter"]
        replaced = f", {len(merged['replaced'])} replaced whole" if merged["replaced"] else ""
        head = "; score head from the adapter" if merged["head"] else ""
        click.echo(f"merged {merged['merged']} tensors of {merged['path']}{replaced}{head}", err=True)


@cli.command()
@click.argument("path", type=click.Path(path_type=str))
@click.option(
    "--revision",
    metavar="REV",
    help="When PATH is a Hugging Face repo id (org/name): its branch, tag or commit. Default: main.",
)
@click.option("--load", is_flag=True, help="Also load it with transformers and score padded probe batches.")
@click.option(
    "--against",
    type=click.Path(path_type=str),
    metavar="SRC",
    help="Compare with the checkpoint it was converted from (a directory or a repo id): backbone bytes (and"
    " with --load, hidden states and rewards).",
)
@click.option("--against-revision", metavar="REV", help="When --against SRC is a repo id: its branch, tag or commit.")
@click.option(
    "--policy",
    type=click.Path(path_type=Path),
    metavar="POLICY",
    help="The policy whose token ids it will be fed (a critic or value model: verl, OpenRLHF, open-instruct's"
    " PPO): check that the vocabularies are identical"
    " (token -> id) and that the embedding covers the policy's tokenizer.",
)
@click.option(
    "--adapter",
    type=click.Path(path_type=Path),
    metavar="ADAPTER",
    help="With --against: PATH was merged from SRC and this LoRA adapter; check every merged tensor against a"
    " fresh merge (bytes).",
)
@click.option("--strict", is_flag=True, help="Warnings count as errors.")
@click.option("--json", "as_json", is_flag=True, help="Print only a JSON report on stdout.")
@reports_errors
def validate(path, revision, load, against, against_revision, policy, adapter, strict, as_json):
    """Check that the reward-model checkpoint PATH (a directory or a Hugging Face repo id) is sound: exit 0
    when no errors (no warnings either under --strict), 1 otherwise."""
    from .doctor.validation import ERROR
    from .doctor.validation import validate as run

    if adapter is not None and against is None:
        raise click.UsageError("--adapter needs --against BASE (the checkpoint the adapter was merged into)")
    findings = run(
        path,
        load=load,
        against=against,
        policy=policy,
        adapter=adapter,
        revision=revision,
        against_revision=against_revision,
    )
    errors = [f for f in findings if f.severity == ERROR or strict]
    warnings = [f for f in findings if f not in errors]
    if as_json:
        document = {
            "path": str(path),
            "valid": not errors,
            "strict": strict,
            "errors": len(errors),
            "warnings": len(warnings),
            "findings": [f.as_dict() for f in findings],
        }
        _echo_json(document)
    else:
        if findings:
            click.echo(f"{'CODE':6} {'SEVERITY':8} {'FILE':32} {'WHERE':28} MESSAGE")
        for f in findings:
            click.echo(f"{f.code:6} {f.severity:8} {f.file:32} {f.where:28} {f.message}")
            if f.hint:
                click.echo(f"{'':6} {'fix:':8} {f.hint}")
        verdict = "valid" if not errors else "invalid"
        click.echo(f"{path}: {verdict} ({len(errors)} errors, {len(warnings)} warnings)")
    if errors:
        sys.exit(ExitCode.ERROR)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON on stdout.")
@reports_errors
def plugins(as_json):
    """List the architectures every installed plugin provides."""
    from .families.host import load_registry

    registry = load_registry()
    claimed = {t for e in registry.entries.values() if not e.architecture.fallback for t in e.architecture.model_types}
    rows = []
    for entry in registry.entries.values():
        arch = entry.architecture
        types = [t for t in arch.model_types if not (arch.fallback and t in claimed)]
        rows.append(
            {
                "architecture": arch.name,
                "plugin": entry.plugin,
                "distribution": entry.distribution,
                "version": entry.version,
                "model_types": types,
            }
        )
    if as_json:
        _echo_json(rows)
        return
    table = [("ARCHITECTURE", "PLUGIN", "DISTRIBUTION", "MODEL TYPES")]
    for row in rows:
        types = row["model_types"]
        shown = ", ".join(types) if len(types) <= 4 else f"{len(types)} model types (--json lists them)"
        table.append((row["architecture"], row["plugin"], f"{row['distribution']} {row['version']}".strip(), shown))
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    for r in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3])


@cli.command()
@click.argument("directory", required=False, type=click.Path(path_type=Path))
@reports_errors
def demo(directory):
    """Build tiny policies of every built-in architecture, convert, validate and load them.

    Nothing is downloaded. Outputs stay in DIRECTORY when given, else in a temporary directory.
    """
    from .demo import run

    ok = run(directory, echo=click.echo)
    if not ok:
        sys.exit(ExitCode.ERROR)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    """Console entry point: SIGTERM is handled like Ctrl-C, so a killed run cleans up too."""
    signal.signal(signal.SIGTERM, _interrupt)
    cli(prog_name="rmconvert")

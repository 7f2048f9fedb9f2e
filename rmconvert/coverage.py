"""Which decoder-only families of the installed transformers rmconvert converts: ``python -m rmconvert.coverage``.

For every model_type with a causal-LM class (encoders and encoder-decoders excluded), build a tiny random
checkpoint; if that works, convert it, load it and score padded batches (``validate --load``). Prints a
Markdown summary: the count, and each exception with its reason.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"


def check(model_type: str, root: Path) -> tuple[str, str]:
    """(outcome, detail) for one model_type: outcome is ok, unbuildable or failed."""
    from .engine import convert
    from .testing import build_checkpoint
    from .validation import ERROR, validate

    try:
        source = build_checkpoint(model_type, root / model_type)
    except Exception as exc:  # noqa: BLE001 (a family the tiny builder cannot make is reported, not fatal)
        return "unbuildable", _reason(exc)
    try:
        report = convert(source, root / f"{model_type}-rm")
        errors = [f for f in validate(root / f"{model_type}-rm", load=True) if f.severity == ERROR]
    except Exception as exc:  # noqa: BLE001 (every failure is a finding of the report)
        return "failed", _reason(exc)
    if errors:
        return "failed", "; ".join(f"{f.code} {f.where}: {f.message}" for f in errors[:3])
    return "ok", f"{report['architecture']}: {report['class']}"


def main(argv=None) -> None:
    from transformers.utils import logging

    from .modeling import decoder_only_model_types

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_types", nargs="*", help="default: every decoder-only model_type")
    args = parser.parse_args(argv)
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.simplefilter("ignore")
    types = args.model_types or sorted(decoder_only_model_types())
    results = {}
    with tempfile.TemporaryDirectory(prefix="rmconvert-coverage-") as tmp:
        for model_type in types:
            results[model_type] = check(model_type, Path(tmp))
            print(f"{model_type:32} {results[model_type][0]:12} {results[model_type][1]}", flush=True)
    import transformers

    buildable = {t: r for t, r in results.items() if r[0] != "unbuildable"}
    ok = [t for t, r in buildable.items() if r[0] == "ok"]
    print(f"\ntransformers {transformers.__version__}: {len(ok)} of {len(buildable)} buildable decoder-only model types"
          f" convert and load ({100 * len(ok) / max(len(buildable), 1):.1f}%); {len(results) - len(buildable)} could"
          " not be built tiny.\n")  # fmt: skip
    print("| model_type | outcome | reason |\n|---|---|---|")
    for model_type, (outcome, detail) in sorted(results.items()):
        if outcome != "ok":
            print(f"| {model_type} | {outcome} | {detail.replace('|', '/')} |")


if __name__ == "__main__":
    main()

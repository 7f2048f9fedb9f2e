"""Which decoder-only families of the installed transformers rmconvert converts: ``python -m rmconvert.coverage``.

For every model_type with a causal-LM class (encoders and encoder-decoders excluded), build a tiny random
checkpoint; if that works, convert it, load it and score padded batches (``validate --load``). Prints a
Markdown summary: the count, and each exception with its reason. A second table does the same for the
vision-language (composite) families: a tiny policy converts, loads with no missing or unexpected key, and,
for the families :mod:`rmconvert.tiny_vlm` knows, its image+text reward is exactly ``score`` of the policy's
backbone and moves with the image.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import tempfile
import time
import warnings
from pathlib import Path

from .errors import summary


def check(model_type: str, root: Path, head: str = "scalar") -> tuple[str, str]:
    """(outcome, detail) for one model_type: ok, unbuildable (no tiny causal LM that runs) or failed; ``head``
    is convert's ``--head`` (``value``: the token classifier)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .doctor.validation import ERROR, validate
    from .engine import convert
    from .testing import build_checkpoint

    try:
        source = build_checkpoint(model_type, root / model_type)
        with torch.no_grad():
            AutoModelForCausalLM.from_pretrained(source)(torch.tensor([[5, 6, 7]]), use_cache=False)
    except Exception as exc:  # noqa: BLE001 (a family the tiny builder cannot make is reported, not fatal)
        return "unbuildable", summary(exc, 160)
    try:
        report = convert(source, root / f"{model_type}-{head}", head=head)
        errors = [f for f in validate(root / f"{model_type}-{head}", load=True) if f.severity == ERROR]
    except Exception as exc:  # noqa: BLE001 (every failure is a finding of the report)
        return "failed", summary(exc, 160)
    if errors:
        return "failed", "; ".join(f"{f.code} {f.where}: {f.message}" for f in errors[:3])
    return "ok", f"{report['architecture']}: {report['class']}"


def _tiny_composite(model_type: str, path: Path) -> Path:
    """A tiny policy of a composite family: :mod:`rmconvert.tiny_vlm`'s config, else the family's default config
    shrunk (:func:`rmconvert.tiny_vlm.shrunk_config`)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from . import tiny_vlm

    if model_type in tiny_vlm.CONFIGS:
        return tiny_vlm.build_policy(model_type, path)
    config = tiny_vlm.shrunk_config(model_type)
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(path)
    AutoConfig.from_pretrained(path)  # a shrunk config transformers' own checks reject is unbuildable
    tiny_vlm.tokenizer_for(model_type).save_pretrained(path)
    return path


def check_composite(model_type: str, root: Path) -> tuple[str, str]:
    """(outcome, detail) for one composite model_type: ok, unbuildable or failed (see the module's docstring)."""
    import torch

    from . import tiny_vlm
    from .engine import convert
    from .families.loading import load_reward_model

    try:
        source = _tiny_composite(model_type, root / model_type)
    except Exception as exc:  # noqa: BLE001 (a family the tiny builder cannot make is reported, not fatal)
        return "unbuildable", summary(exc, 160)
    try:
        report = convert(source, root / f"{model_type}-rm")
        model, info = load_reward_model(root / f"{model_type}-rm", output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 (every failure is a finding of the report)
        return "failed", summary(exc, 160)
    wrong = {k: v for k, v in info.items() if v}
    if wrong:
        return "failed", "; ".join(f"{k}: {len(v)} ({list(v)[:2]})" for k, v in wrong.items())
    if model_type not in tiny_vlm.CONFIGS:
        return "ok", f"{report['class']} (loads)"
    model = model.eval()
    policy = tiny_vlm.build_model(model_type)
    sample = tiny_vlm.image_inputs(policy, model_type, seed=0)
    other = {**sample, **{k: v for k, v in tiny_vlm.image_inputs(policy, model_type, seed=1).items() if "pixel" in k}}
    with torch.no_grad():
        expected = model.score(policy.model(**sample).last_hidden_state)[0, -1]
        reward = model(**sample).logits[0]
        moved = not torch.equal(model(**other).logits[0], reward)
    if not torch.allclose(reward, expected, atol=1e-5, rtol=1e-5) or not moved:
        return "failed", f"image+text reward {reward.tolist()} vs {expected.tolist()}; another image moves it: {moved}"
    return "ok", f"{report['class']} (image+text reward exact)"


_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["torch", "transformers", "rmconvert.engine", "rmconvert.doctor.validation"])


def _child(model_type: str, root: Path, memory: int, conn, composite: bool = False, head: str = "scalar") -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.simplefilter("ignore")
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    try:
        conn.send(check_composite(model_type, root) if composite else check(model_type, root, head))
    except BaseException as exc:  # noqa: BLE001 (MemoryError and the like end up in the report)
        conn.send(("unbuildable", f"crashed: {summary(exc, 160)}"))


def check_all(
    model_types,
    root: Path,
    memory: int,
    seconds: int,
    jobs: int = 2,
    on_result=None,
    composite: bool = False,
    head: str = "scalar",
) -> dict:
    """``check`` of every model_type, each in a child process with bounded memory and time (some "tiny"
    configs are not tiny), ``jobs`` at a time; ``on_result(model_type, result)`` as each ends.

    Children fork from a fork server that has imported torch and transformers but run nothing (forking a
    process whose torch threads have run can deadlock), so each check starts warm and safe. A child that dies
    without an answer (killed for memory, a crash in native code) is reported as such. ``head``: convert's
    ``--head`` (``value`` or ``prm``: every family as a token classifier).
    """
    from multiprocessing.connection import wait as wait_any

    pending, running, results = list(model_types), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            model_type = pending.pop(0)
            receive, send = multiprocessing.Pipe(duplex=False)
            worker = _CONTEXT.Process(target=_child, args=(model_type, root, memory, send, composite, head))
            worker.start()
            send.close()  # the child holds the only writer: its death ends the pipe
            running[receive] = (model_type, worker, time.monotonic() + seconds)
        ready = wait_any(list(running), max(0.0, min(d for _, _, d in running.values()) - time.monotonic()))
        for conn, (model_type, worker, deadline) in list(running.items()):
            if conn in ready:
                try:
                    result = tuple(conn.recv())
                except EOFError:
                    worker.join()
                    result = ("unbuildable", f"crashed: the check's process ended with {worker.exitcode}")
            elif time.monotonic() >= deadline:
                worker.kill()
                result = ("unbuildable", f"took more than {seconds} s")
            else:
                continue
            worker.join()
            conn.close()
            del running[conn]
            results[model_type] = result
            if on_result is not None:
                on_result(model_type, result)
    return results


def main(argv=None) -> None:
    from transformers.utils import logging

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_types", nargs="*", help="default: every decoder-only model_type")
    parser.add_argument("--memory-gib", type=int, default=8, help="memory limit of each check (default 8)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds allowed for each check (default 300)")
    parser.add_argument("--jobs", type=int, default=2, help="checks run at once (default 2)")
    parser.add_argument("--composite", action="store_true", help="only the second table (vision-language families)")
    parser.add_argument(
        "--head", default="scalar", help="convert's --head (value, prm: token classifiers; decoder-only table only)"
    )
    args = parser.parse_args(argv)
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.simplefilter("ignore")
    import transformers

    from .families.modeling import composite_model_types, decoder_only_model_types, is_composite

    named = args.model_types
    tables = []
    if not args.composite:
        tables.append(
            (
                "decoder-only",
                [t for t in named if not is_composite(t)] if named else sorted(decoder_only_model_types()),
                False,
            )
        )
    if args.head == "scalar":  # --head prm|value is refused for a composite model (no token classifier)
        tables.append(
            (
                "vision-language (composite)",
                [t for t in named if is_composite(t)] if named else sorted(composite_model_types()),
                True,
            )
        )
    for title, types, composite in tables:
        if not types:
            continue
        with tempfile.TemporaryDirectory(prefix="rmconvert-coverage-") as tmp:
            results = check_all(
                types,
                Path(tmp),
                args.memory_gib << 30,
                args.timeout,
                args.jobs,
                lambda model_type, result: print(f"{model_type:32} {result[0]:12} {result[1]}", flush=True),
                composite,
                args.head,
            )
        buildable = {t: r for t, r in results.items() if r[0] != "unbuildable"}
        ok = [t for t, r in buildable.items() if r[0] == "ok"]
        print(
            f"\ntransformers {transformers.__version__}: {len(ok)} of {len(buildable)} buildable {title} model types"
            f" convert and load ({100 * len(ok) / max(len(buildable), 1):.1f}%); {len(results) - len(buildable)} could"
            " not be built tiny.\n"
        )
        print("| model_type | outcome | reason |\n|---|---|---|")
        for model_type, (outcome, detail) in sorted(results.items()):
            if outcome != "ok" or composite:
                print(f"| {model_type} | {outcome} | {detail.replace('|', '/')} |")


if __name__ == "__main__":
    main()

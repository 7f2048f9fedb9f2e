"""``rmconvert demo``: tiny policies of every built-in architecture, converted, validated and loaded."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .doctor.validation import ERROR, validate
from .engine import convert
from .testing import build_checkpoint

DEMO_KINDS = ("llama3", "llama2", "olmo2", "olmoe", "qwen2")


def _score(path: Path) -> tuple[str, bool]:
    """Load with transformers; (reward of a padded batch's first row, padded batch == one by one)."""
    import torch
    from transformers import AutoTokenizer

    from .doctor.probes import positions
    from .families.loading import load_reward_model

    model = load_reward_model(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    texts = ["the answer is good", "hello world the reward model is helpful and honest"]
    with torch.no_grad():
        batch = tok(texts, return_tensors="pt", padding=True)
        batched = model(**batch, position_ids=positions(batch["attention_mask"])).logits
        single = torch.cat([model(**tok([t], return_tensors="pt")).logits for t in texts])
    reward = batched[0, -1].item()  # logits[:, 0] for a scalar head, logits[:, 1] for Bradley-Terry
    return f"{reward:+.4f}", torch.allclose(batched, single, atol=1e-5)


def run(directory: Path | None, echo=print) -> bool:
    """Run the demo in ``directory`` (kept) or a temporary one; True when every model is sound."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="rmconvert-demo-") as tmp:
        root = Path(directory) if directory else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        row = "{:8} {:6} {:32} {:40} {:10} {:6} {:8} {}"
        echo(row.format("policy", "head", "class", "pad", "vocab", "valid", "batches", "reward"))
        ok = True
        for kind in DEMO_KINDS:
            src = build_checkpoint(kind, root / f"{kind}-policy")
            for head in ("scalar", "bt"):
                dst = root / f"{kind}-rm-{head}"
                report = convert(src, dst, head=head, overwrite=True)
                errors = [f for f in validate(dst) if f.severity == ERROR]
                reward, consistent = _score(dst)
                ok &= not errors and consistent
                pad, vocab = report["pad"], report["vocab"]
                echo(
                    row.format(
                        kind,
                        head,
                        report["class"],
                        f"{pad['token']} = {pad['id']} ({pad['action']})",
                        f"{vocab['from']}->{vocab['to']}",
                        "yes" if not errors else "NO",
                        "same" if consistent else "DIFFER",
                        reward,
                    )
                )
        if directory:
            echo(f"checkpoints kept in {root}")
    return ok

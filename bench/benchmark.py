"""Benchmark ``rmconvert convert`` against ``cp -r`` and the naive transformers path.

Builds random checkpoints once (cached under bench/cache), then runs the three approaches alternately,
each as its own process followed by ``sync``, and prints wall time and peak RSS (median of the runs)
with ratios measured in the same run. Usage: ``python bench/benchmark.py [--runs 3] [--models ...]``.

``--lora`` instead merges a LoRA adapter (r=16 on every linear layer of llama-1b, made by PEFT, needs peft):
``rmconvert convert BASE DST --adapter ADAPTER`` against PEFT's ``merge_and_unload()`` + ``save_pretrained``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TIME = "/usr/bin/time"  # GNU time (Debian package "time")
DROP_CACHES = "/proc/sys/vm/drop_caches"  # writable by root: cold-cache runs
MODELS = {
    # ~0.95B Llama, bf16, vocab 32000 with no pad token: the embedding grows and <pad> is added.
    "llama-1b": {
        "model_type": "llama",
        "layers": 16,
        "hidden": 2048,
        "intermediate": 5632,
        "heads": 16,
        "vocab": 32000,
    },
    # the same family at ~2x the parameters, to show how time and memory scale.
    "llama-2b": {
        "model_type": "llama",
        "layers": 34,
        "hidden": 2048,
        "intermediate": 5632,
        "heads": 16,
        "vocab": 32000,
    },
    # llama-1b's weights saved by torch.save as .bin shards (pytorch_model-0000i-of-00004.bin + index).
    "llama-1b-bin": {"bin_of": "llama-1b"},
    # ~1 GiB Qwen2.5-VL (vision tower, projector, language model) in the released model.* + visual.* names: every
    # language-model and vision tensor is renamed (a new header; the bytes copied), the vocabulary grows for <pad>.
    "qwen2_5_vl-0.5b": {
        "model_type": "qwen2_5_vl",
        "layers": 12,
        "hidden": 1536,
        "intermediate": 4096,
        "heads": 12,
        "vocab": 32000,
        "vision": {
            "depth": 16,
            "hidden_size": 1024,
            "intermediate_size": 2816,
            "num_heads": 16,
            "out_hidden_size": 1536,
        },
    },
    # ~0.75B OLMoE with 64 experts per layer, stored per expert on disk.
    "olmoe-0.7b": {
        "model_type": "olmoe",
        "layers": 12,
        "hidden": 1024,
        "intermediate": 256,
        "heads": 16,
        "vocab": 50304,
        "experts": 64,
        "pad": "<|pad|>",
    },
}

NAIVE = r"""
import sys
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from rmconvert.families.loading import register_classes
src, dst = sys.argv[1:3]
register_classes(src)  # OLMoE has no sequence-classification class in transformers
tok = AutoTokenizer.from_pretrained(src)
if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
    tok.add_special_tokens({"pad_token": "<pad>"})
model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=1, dtype="auto")
if len(tok) > model.get_input_embeddings().weight.shape[0]:
    model.resize_token_embeddings(len(tok), pad_to_multiple_of=8)
model.config.pad_token_id = tok.pad_token_id
model.save_pretrained(dst)
tok.save_pretrained(dst)
"""

#: The LoRA row: an adapter of r=16 on every linear layer of the llama-1b checkpoint.
LORA = {
    "base": "llama-1b",
    "r": 16,
    "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}

PEFT = r"""
import sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, dst = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(dst)
"""


def build_lora(cache: Path) -> Path:
    """The LoRA adapter of the LoRA row (PEFT, init_lora_weights=False: A and B random, seeded)."""
    path = cache / f"{LORA['base']}-lora-r{LORA['r']}"
    if (path / "adapter_config.json").exists():
        return path
    from rmconvert.testing import build_adapter

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_adapter(
        cache / LORA["base"], tmp, dtype="bfloat16", r=LORA["r"], lora_alpha=32, target_modules=LORA["targets"]
    )
    tmp.rename(path)
    return path


def run_lora(args, rmconvert: str, caches: list[str]) -> None:
    """The LoRA row: rmconvert's streaming merge against PEFT's merge_and_unload + save_pretrained."""
    subprocess.run([sys.executable, __file__, "--build", LORA["base"], "--cache", str(args.cache)], check=True)
    subprocess.run([sys.executable, __file__, "--build", "lora", "--cache", str(args.cache)], check=True)
    src, adapter, out = args.cache / LORA["base"], build_lora(args.cache), args.cache / "out"
    approaches = {
        "rmconvert convert --adapter": [rmconvert, "convert", str(src), str(out), "--adapter", str(adapter)],
        "rmconvert convert --adapter --no-source-hashes": [
            rmconvert, "convert", "--no-source-hashes", str(src), str(out), "--adapter", str(adapter)
        ],
        "PEFT merge_and_unload + save_pretrained": [sys.executable, "-c", PEFT, str(src), str(adapter), str(out)],
    }  # fmt: skip
    print(f"LoRA r={LORA['r']} on every linear layer of {LORA['base']}; median of {args.runs} alternating runs\n")
    print("| model | adapter | cache | approach | wall (s) | peak RSS (MiB) | PEFT / this: time, memory |")
    print("|---|---|---|---|---|---|---|")
    for cache in caches:
        results: dict[str, list[tuple[float, float]]] = {a: [] for a in approaches}
        for _ in range(args.runs):
            for approach, command in approaches.items():
                shutil.rmtree(out, ignore_errors=True)
                results[approach].append(measure(command, cache == "cold"))
        shutil.rmtree(out, ignore_errors=True)
        median = {
            a: (statistics.median(w for w, _ in r), statistics.median(m for _, m in r)) for a, r in results.items()
        }
        peft = median["PEFT merge_and_unload + save_pretrained"]
        for approach, (wall, rss) in median.items():
            versus = f"{peft[0] / wall:.1f}x, {peft[1] / rss:.1f}x" if approach.startswith("rmconvert") else ""
            print(
                f"| {LORA['base']} | {size_of(adapter) / 2**20:.0f} MiB | {cache} | {approach} | {wall:.2f} |"
                f" {rss:.0f} | {versus} |",
                flush=True,
            )


def build(name: str, spec: dict, cache: Path) -> Path:
    """A random bf16 causal LM saved by transformers in ~500 MB shards, with a word-level tokenizer (or, for
    ``bin_of``, that model's shards saved by ``torch.save`` as ``.bin``)."""
    path = cache / name
    if (path / "config.json").exists():
        return path
    if "bin_of" in spec:
        from rmconvert.testing import save_as_bin

        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_as_bin(build(spec["bin_of"], MODELS[spec["bin_of"]], cache), tmp).rename(path)
        return path
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"] + ([spec["pad"]] if spec.get("pad") else [])
    tokens = spec["vocab"] - (24 if spec.get("pad") else 0)
    vocab = {w: i for i, w in enumerate(specials + [f"w{i}" for i in range(tokens - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    extra = {"num_experts": spec["experts"], "num_experts_per_tok": 8} if "experts" in spec else {}
    text = dict(
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["heads"],
        vocab_size=spec["vocab"],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=vocab.get(spec.get("pad")),
        **extra,
    )
    if "vision" in spec:  # a composite policy: the text settings in text_config, image tokens inside the vocabulary
        ids = {"image_token_id": 10, "video_token_id": 11, "vision_start_token_id": 12, "vision_end_token_id": 13}
        config = AutoConfig.for_model(spec["model_type"], text_config=text, vision_config=spec["vision"], **ids)
    else:
        config = AutoConfig.for_model(spec["model_type"], **text)
    torch.manual_seed(0)
    from transformers.utils import logging

    logging.disable_progress_bar()
    if "vision" in spec:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="500MB")
    roles = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": spec.get("pad")}
    PreTrainedTokenizerFast(tokenizer_object=tok, **{k: v for k, v in roles.items() if v}).save_pretrained(tmp)
    tmp.rename(path)
    return path


def measure(command: list[str], cold: bool) -> tuple[float, float]:
    """(wall seconds including a final sync, peak RSS MiB) of ``command``; ``cold`` empties the page cache first.

    Peak RSS comes from GNU time, which forks a small process to exec the command: measured from
    Python, a child would inherit the benchmark process's own high-water mark through vfork + exec.
    """
    subprocess.run(["sync"], check=True)
    if cold:
        Path(DROP_CACHES).write_text("3\n")
    start = time.perf_counter()
    proc = subprocess.run(
        [TIME, "-f", "%M", *command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False
    )
    subprocess.run(["sync"], check=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{proc.stderr}")
    return wall, int(proc.stderr.strip().splitlines()[-1]) / 1024


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--cache", type=Path, default=HERE / "cache")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--build", metavar="MODEL", help="only build (or find) MODEL's checkpoint (or lora)")
    parser.add_argument("--lora", action="store_true", help="the LoRA row instead: merge an adapter, rmconvert vs PEFT")
    args = parser.parse_args()
    if args.build:
        build_lora(args.cache) if args.build == "lora" else build(args.build, MODELS[args.build], args.cache)
        return
    rmconvert = shutil.which("rmconvert") or str(Path(sys.executable).with_name("rmconvert"))
    if args.lora:
        run_lora(args, rmconvert, ["warm", "cold"] if os.access(DROP_CACHES, os.W_OK) else ["warm"])
        return
    out = args.cache / "out"
    approaches = {
        "cp -r": lambda src: ["cp", "-r", str(src), str(out)],
        "rmconvert convert": lambda src: [rmconvert, "convert", str(src), str(out)],
        "rmconvert convert --no-source-hashes": lambda src: [
            rmconvert,
            "convert",
            "--no-source-hashes",
            str(src),
            str(out),
        ],
        "naive transformers": lambda src: [sys.executable, "-c", NAIVE, str(src), str(out)],
    }
    if args.skip_naive:
        del approaches["naive transformers"]
    caches = ["warm", "cold"] if os.access(DROP_CACHES, os.W_OK) else ["warm"]
    names = args.models.split(",")
    for name in names:  # built in a child process, so this one stays small
        subprocess.run([sys.executable, __file__, "--build", name, "--cache", str(args.cache)], check=True)
    print(f"median of {args.runs} alternating runs; wall includes process start and a final sync\n")
    print("| model | size | cache | approach | wall (s) | peak RSS (MiB) | wall / cp | naive / this: time, memory |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        src = args.cache / name
        for cache in caches:
            results: dict[str, list[tuple[float, float]]] = {a: [] for a in approaches}
            for _ in range(args.runs):
                for approach, command in approaches.items():  # alternate, so drift hits every approach alike
                    shutil.rmtree(out, ignore_errors=True)
                    results[approach].append(measure(command(src), cache == "cold"))
            shutil.rmtree(out, ignore_errors=True)
            median = {
                a: (statistics.median(w for w, _ in r), statistics.median(m for _, m in r)) for a, r in results.items()
            }
            cp_wall = median["cp -r"][0]
            naive = median.get("naive transformers")
            for approach, (wall, rss) in median.items():
                versus = (
                    f"{naive[0] / wall:.1f}x, {naive[1] / rss:.1f}x"
                    if naive and approach.startswith("rmconvert")
                    else ""
                )
                print(
                    f"| {name} | {size_of(src) / 2**30:.2f} GiB | {cache} | {approach} | {wall:.2f} | {rss:.0f} |"
                    f" {wall / cp_wall:.2f} | {versus} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()

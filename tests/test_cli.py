"""The command line (ilrdpo.cli): `ilrdpo train` end to end, and bad input as one line, exit 2.

One test goes through the installed console script in a process of its own (what a user types);
the rest call cli.main() in this process with sys.argv set, which is the same code path minus the
interpreter start-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import DESIGN_METRICS, call_main, console_script, first_lines
from ilrdpo import cli
from ilrdpo.cli_args import split_config
from ilrdpo.config import load_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PAIRS_FILE = EXAMPLES / "pairs.jsonl"


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The installed console script in a process of its own: what a user's shell runs."""
    return subprocess.run(console_script() + args, cwd=cwd, env=os.environ.copy(), capture_output=True, text=True,
                          timeout=300, check=False)


def answer_logps(model, tokenizer) -> torch.Tensor:
    from ilrdpo.data import collate_pairs, load_pairs, tokenize_pairs
    from ilrdpo.logprobs import sequence_logps

    examples = tokenize_pairs(tokenizer, load_pairs(str(PAIRS_FILE))[:4], max_length=128)
    batch = collate_pairs(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        logps, _ = sequence_logps(model.eval(), batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    return logps


def test_train_end_to_end(tiny_model_dir, tokenizer, tmp_path, monkeypatch, capsys):
    """YAML config + overrides -> model/ (safetensors, tokenizer, card), metrics.jsonl, config.yaml."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    config_file = tmp_path / "train.yaml"
    config_file.write_text(f"model:\n  name_or_path: {tiny_model_dir}\n  dtype: float32\n"
                           f"data:\n  pairs: {PAIRS_FILE}\n"
                           f"loss:\n  alpha: 0.01\noutput_dir: {out}\n")
    monkeypatch.chdir(tmp_path)
    status = call_main(monkeypatch, ["train", str(config_file), "train.batch_size=8", "train.max_length=128",
                                     "train.learning_rate=1e-3"])
    assert status == 0, capsys.readouterr().err

    model_dir = out / "model"
    assert (model_dir / "model.safetensors").is_file() and not list(model_dir.glob("*.bin"))
    assert (model_dir / "tokenizer.json").is_file()
    card = (model_dir / "README.md").read_text()
    assert "ilrdpo" in card and "LR-DPO (alpha=0.01)" in card and "16 pairs" in card
    assert not (out / "model.staging").exists() and not (out / "model.old").exists()
    trained = AutoModelForCausalLM.from_pretrained(model_dir)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(trained.model.embed_tokens.weight, initial.model.embed_tokens.weight)

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]  # 16 pairs / batch 8, one epoch
    assert all(DESIGN_METRICS <= m.keys() for m in metrics)

    resolved = load_config(out / "config.yaml")
    assert resolved.model.name_or_path == str(tiny_model_dir) and resolved.data.pairs == str(PAIRS_FILE)
    assert (resolved.loss.alpha, resolved.train.batch_size, resolved.train.learning_rate) == (0.01, 8, 1e-3)
    assert resolved == load_config(config_file, ["train.batch_size=8", "train.max_length=128",
                                                 "train.learning_rate=1e-3"])


@pytest.mark.smoke  # the console script in a process
def test_malformed_jsonl_line_is_one_line_and_exit_2(tmp_path):
    """Through the installed `ilrdpo` script: FILE:LINE on stderr, exit 2, no traceback."""
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "Q", "chosen": "A", "rejected": "B"}\n\n{"prompt": "Q", "chosen": \n')
    proc = run_cli(["train", f"data.pairs={bad}", f"output_dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and f"{bad}:3: invalid JSON" in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,key", [
    (["train", "loss.alphaa=0.1"], "loss.alphaa"),
    (["train", "model.lora.rr=4"], "model.lora.rr"),
])
def test_unknown_config_key_exits_2_naming_it(monkeypatch, capsys, args, key):
    assert call_main(monkeypatch, args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: command line: unknown config key '{key}'") and err.count("\n") == 1


def test_unknown_key_in_config_file(monkeypatch, capsys, tmp_path):
    config_file = tmp_path / "bad.yaml"
    config_file.write_text("loss:\n  beta: 0.1\n  alphaa: 0.2\n")
    assert call_main(monkeypatch, ["train", str(config_file)]) == 2
    assert capsys.readouterr().err == (f"error: {config_file}: unknown config key 'loss.alphaa' "
                                       "(did you mean 'loss.alpha'?)\n")


def test_bad_pair_field_names_file_and_line(monkeypatch, capsys, tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"prompt": "Q", "chosen": "A"}) + "\n")
    assert call_main(monkeypatch, ["train", f"data.pairs={bad}", f"output_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err == f"error: {bad}:1: missing field 'rejected'\n"


@pytest.mark.smoke
def test_lora_run_saves_the_adapter_its_mapping_built(monkeypatch, tiny_model_dir, tokenizer, tmp_path):
    """model.lora is PEFT's LoraConfig arguments over the defaults (use_rslora reaches the adapter);
    model/ holds the adapter alone (model.merge_lora is gone), config.yaml the resolved mapping;
    merged weights, as a round saves them for a server, compute what base + adapter compute."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from ilrdpo.models import save_model

    out = tmp_path / "lora"
    status = call_main(monkeypatch, [
        "train", f"model.name_or_path={tiny_model_dir}", f"data.pairs={first_lines(PAIRS_FILE, 4, tmp_path)}",
        "model.dtype=float32", "model.lora.r=4", "model.lora.lora_dropout=0.0", "model.lora.use_rslora=true",
        "train.batch_size=4", "train.learning_rate=1e-2", "train.warmup_ratio=0", "train.max_length=128",
        f"output_dir={out}"])
    assert status == 0
    model_dir = out / "model"
    adapter = json.loads((model_dir / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["use_rslora"], adapter["task_type"]) == (4, 32, True, "CAUSAL_LM")
    assert (model_dir / "adapter_model.safetensors").is_file() and (model_dir / "README.md").is_file()
    assert not (model_dir / "model.safetensors").exists() and not (model_dir / "merged").exists()
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["lora"] == {
        "lora_alpha": 32, "lora_dropout": 0.0, "r": 4, "target_modules": "all-linear", "use_rslora": True}

    adapted = AutoPeftModelForCausalLM.from_pretrained(model_dir)
    save_model(adapted, tokenizer, tmp_path / "saved", {"title": "merged"}, merge_lora=True)
    assert (tmp_path / "saved" / "merged" / "tokenizer.json").is_file()
    merged_logps = answer_logps(AutoModelForCausalLM.from_pretrained(tmp_path / "saved" / "merged"), tokenizer)
    torch.testing.assert_close(merged_logps, answer_logps(adapted, tokenizer), rtol=1e-5, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert (merged_logps - answer_logps(base, tokenizer)).abs().max() > 1e-2  # the adapter learned something


@pytest.mark.parametrize("args,expected", [
    (["c.yaml", "loss.beta=1"], ("c.yaml", ["loss.beta=1"])),
    (["loss.beta=1"], (None, ["loss.beta=1"])),
    (["cfg/c=1.yaml", "output_dir=runs/a.yaml"], ("cfg/c=1.yaml", ["output_dir=runs/a.yaml"])),
    (["--config", "c.yaml", "--beta", "0.2", "--loss.alpha=0.1", "--gradient-checkpointing", "seed=3"],
     ("c.yaml", ["beta=0.2", "loss.alpha=0.1", "gradient_checkpointing=true", "seed=3"])),
])
def test_config_and_overrides_in_every_form(args, expected):
    """TRL-style `--key value` flags and `--config` next to `key=value` (typer hands unknown
    options of train/run through as arguments)."""
    from ilrdpo.cli_args import split_config

    assert split_config(args[0], args[1:]) == expected


def test_trl_flag_on_the_command_line_overrides_the_file(monkeypatch, tmp_path, capsys):
    """`--beta 0.2` (TRL's name) beats the file's loss.beta and reaches the config: the run stops
    only at the missing pairs file, after the config was built."""
    config_file = tmp_path / "c.yaml"
    config_file.write_text("loss:\n  beta: 0.3\n")
    code = call_main(monkeypatch, ["train", "--config", str(config_file), "--beta", "0.2",
                                   "data.pairs=missing.jsonl", f"output_dir={tmp_path / 'o'}"])
    assert code == 2 and capsys.readouterr().err == "error: missing.jsonl: file not found\n"


@pytest.mark.smoke
def test_a_removed_key_exits_2_with_one_line_saying_what_to_use(monkeypatch, capsys):
    """`ilrdpo train loss.alpha_relative=true` once trained silently with the raw per-token alpha
    (the loop alone resolved the key); the key is gone, and using it is one line, exit 2."""
    assert call_main(monkeypatch, ["train", "loss.alpha_relative=true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: command line: config key 'loss.alpha_relative' was removed; use ") and \
        err.count("\n") == 1


@pytest.mark.smoke
def test_train_decides_alpha_as_each_round_of_run_does(monkeypatch, tiny_model_dir, tokenizer, tmp_path):
    """experimental.alpha_neutral with `ilrdpo train`: the alpha trained with is the setting times the
    pairs' neutral alpha (alpha.per_unit_alpha, as in the loop), in the card and in every metrics line."""
    from ilrdpo.alpha import neutral_alpha
    from ilrdpo.data import count_tokens
    from ilrdpo.records import read_pairs

    out, pairs_file = tmp_path / "run", tmp_path / "pairs.jsonl"
    # chosen answers longer (the neutral alpha is 0 when they are shorter on average)
    rows = [json.loads(line) for line in PAIRS_FILE.read_text().splitlines()[:6]]
    pairs_file.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["rejected"], "rejected": r["chosen"]})
                                  + "\n" for r in rows))
    assert call_main(monkeypatch, [
        "train", f"model.name_or_path={tiny_model_dir}", f"data.pairs={pairs_file}",
        "model.dtype=float32", "loss.type=ipo", "loss.alpha=1.5", "experimental.alpha_neutral=true",
        "train.batch_size=2", "train.warmup_ratio=0", "train.max_length=128", f"output_dir={out}"]) == 0
    pairs = read_pairs(pairs_file)
    gaps = [count_tokens(tokenizer, p.chosen) - count_tokens(tokenizer, p.rejected) for p in pairs]
    expected = 1.5 * neutral_alpha(gaps, 0.5)
    assert expected > 0
    info = json.loads((out / "model" / "ilrdpo.json").read_text())
    assert info["hyperparameters"]["loss.alpha"] == pytest.approx(expected, rel=1e-6)
    for line in (out / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if abs(m["length/chosen"] - m["length/rejected"]) > 0.5:
            assert m["length/margin_term"] / (m["length/chosen"] - m["length/rejected"]) == pytest.approx(expected)


# --- first contact: help, flags, config-help --------------------------------------------------------

COMMANDS = ["train", "run", "evaluate", "generate", "chat", "tune", "demo", "report", "config-help", "config-migrate"]


@pytest.mark.slow  # a fresh interpreter: this one has torch loaded already
def test_help_loads_neither_torch_nor_transformers(tmp_path):
    """`ilrdpo --help` and every command's help answer without importing torch or transformers
    (they take seconds): imported and run in a fresh interpreter, which then lists what it loaded."""
    script = ("import sys\nfrom ilrdpo import cli\n"
              f"for args in [['--help'], *[[c, '--help'] for c in {COMMANDS!r}]]:\n"
              "    sys.argv = ['ilrdpo', *args]\n"
              "    try:\n        cli.main()\n    except SystemExit as stop:\n        assert not stop.code, args\n"
              "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=os.environ.copy(), check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.unit
@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_no_type_placeholders(monkeypatch, capsys, command):
    assert call_main(monkeypatch, [command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "<bool>" not in out and "Usage: ilrdpo" in out
    assert all(len(line) <= 80 for line in out.splitlines())


@pytest.mark.unit
@pytest.mark.parametrize("command", ["train", "run", "tune"])
def test_config_commands_show_the_config_option_and_what_is_required(monkeypatch, capsys, command):
    call_main(monkeypatch, [command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--config FILE" in out and "`ilrdpo config-help`" in out and "--push-to-hub org/name" in out
    if command != "tune":
        assert {"train": "Required: data.pairs", "run": "Required: data.prompts"}[command] in out


@pytest.mark.unit
def test_config_option_and_a_config_argument_are_the_same(monkeypatch, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("loss:\n  beta: 0.3\n")
    assert split_config(None, ["loss.alpha=0.1"], str(config)) == (str(config), ["loss.alpha=0.1"])
    assert split_config(str(config), ["loss.alpha=0.1"]) == (str(config), ["loss.alpha=0.1"])


def sampling_options(command: str) -> dict[str, bool]:
    """{option: takes a value} of a command."""
    import typer

    click_command = typer.main.get_command(cli.app).commands[command]
    return {opt: not p.is_flag for p in click_command.params for opt in p.opts if opt.startswith("--")}


@pytest.mark.unit
def test_generate_and_chat_share_their_sampling_flags_with_one_meaning():
    shared = {"--model", "--best-of", "--scorer", "--target-length", "--length-unit", "--length-weight", "--system",
              "--max-new-tokens", "--temperature", "--top-p", "--seed"}
    generate, chat = sampling_options("generate"), sampling_options("chat")
    assert shared <= generate.keys() and shared <= chat.keys()
    assert all(generate[o] == chat[o] for o in shared) and generate["--best-of"]  # --best-of N in both


@pytest.mark.unit
def test_best_of_and_a_different_num_samples_are_refused(monkeypatch, capsys, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n')
    code = call_main(monkeypatch, ["generate", "--model", str(tmp_path), "--prompts", str(prompts), "--out",
                                   str(tmp_path / "o.jsonl"), "--num-samples", "3", "--best-of", "5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: options '--num-samples' 3 and '--best-of' 5") and "\n" not in err


@pytest.mark.unit
def test_config_help_in_a_pipe_keeps_every_key_whole_within_80_columns(monkeypatch, capsys):
    from ilrdpo.config import field_docs

    assert call_main(monkeypatch, ["config-help"]) == 0
    out = capsys.readouterr().out
    heads = [line.split(" = ")[0] for line in out.splitlines() if line and not line.startswith(" ")]
    assert heads == [key for key, _, _ in field_docs()] and "loss.length_unit = 'tokens'" in out
    assert "…" not in out and all(len(line) <= 80 for line in out.splitlines())


@pytest.mark.unit
@pytest.mark.parametrize("command,option", [("generate", "--top-p"), ("chat", "--max-new-tokens"),
                                            ("evaluate", "--max-new-tokens")])
def test_a_bad_generation_option_is_one_line_naming_it(monkeypatch, capsys, tmp_path, command, option):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi", "reference": "Hello."}\n')
    files = {"generate": ["--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl")],
             "evaluate": ["--prompts", str(prompts)], "chat": []}[command]
    code = call_main(monkeypatch, [command, "--model", str(tmp_path), *files, option, "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: option '{option}': ") and "\n" not in err

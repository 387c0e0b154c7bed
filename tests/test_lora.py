"""model.lora, a mapping of PEFT LoraConfig arguments (ilrdpo.lora): the defaults under the user's
fields, one-line errors when the config is read, the mapping reaching PEFT, old run directories."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from helpers import call_main
from ilrdpo.config import Config, load_config
from ilrdpo.errors import UserInputError
from ilrdpo.lora import LORA_DEFAULTS
from ilrdpo.resume import check_resume
from ilrdpo.rundir import STAGES, RunDir

FINISHED = {0: ["eval"], 1: list(STAGES)}


@pytest.mark.unit
def test_the_mapping_holds_the_defaults_under_the_users_fields_sorted():
    """`{}` = the defaults, null = full fine-tuning, a field alone (`model.lora.r=8`) turns LoRA on;
    any LoraConfig field is taken; config.yaml's mapping is sorted, so it reads the same each time."""
    assert load_config(None, ["model.lora={}"]).model.lora == LORA_DEFAULTS
    assert load_config(None, ["model.lora=null"]).model.lora is None and Config().model.lora is None
    lora = load_config(None, ["model.lora.use_rslora=true", "model.lora.r=8", "model.lora.layers_to_transform=[0]",
                              "model.lora.target_modules=[q_proj]"]).model.lora
    assert lora == {**LORA_DEFAULTS, "r": 8, "use_rslora": True, "layers_to_transform": [0],
                    "target_modules": ["q_proj"]}
    assert list(lora) == sorted(lora)


@pytest.mark.unit
@pytest.mark.parametrize("override,line", [
    ("model.lora.alpha=64", "config key 'model.lora.alpha': is PEFT's lora_alpha now; write model.lora.lora_alpha"),
    ("model.lora.dropout=0", ("config key 'model.lora.dropout': is PEFT's lora_dropout now; write "
                             "model.lora.lora_dropout")),
    ("model.lora.task_type=SEQ_CLS", "config key 'model.lora.task_type': is set by ilrdpo (CAUSAL_LM); remove it"),
    ("model.lora.use_rslra=true", "unknown config key 'model.lora.use_rslra' (did you mean 'model.lora.use_rslora'?)"),
    ("model.lora.r=0", "config key 'model.lora.r': 0 must be greater than 0"),
    ("model.lora.r=4.5", "config key 'model.lora.r': 4.5: input should be a valid integer"),
    ("model.lora.lora_dropout=1", "config key 'model.lora.lora_dropout': 1 must be at least 0 and below 1"),
    ("model.lora.bias=nonee", "config key 'model.lora.bias': 'nonee': input should be 'none', 'all' or 'lora_only'"),
    # PEFT's own ValueError, raised when LoraConfig is built
    ("model.lora.layers_pattern=layers", "config key 'model.lora.layers_pattern': PEFT refuses it: `layers_pattern` "),
    ("model.lora=8", "config key 'model.lora': expected a mapping of PEFT LoraConfig arguments"),
    ("model.merge_lora=true", ("config key 'model.merge_lora' was removed; use nothing: a LoRA run saves adapters "
                              "(merge one with PEFT's PeftModel.from_pretrained(base, folder).merge_and_unload())")),
])
def test_a_bad_lora_field_is_one_line_before_anything_is_written(monkeypatch, capsys, tmp_path, override, line):
    out = tmp_path / "run"
    assert call_main(monkeypatch, ["train", "data.pairs=pairs.jsonl", override, f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: command line: {line}") and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.unit
def test_the_short_names_in_a_file_are_one_line_naming_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  lora:\n    r: 8\n    alpha: 16\n")
    with pytest.raises(UserInputError) as info:
        load_config(path)
    assert str(info.value) == (f"{path}: config key 'model.lora.alpha': is PEFT's lora_alpha now; "
                               "write model.lora.lora_alpha")
    assert info.value.exit_code == 2


def old_lora_run(tmp_path) -> RunDir:
    """A run directory whose config.yaml was recorded before model.lora took PEFT's names and
    model.merge_lora went."""
    old = Config().model_dump(mode="json")
    old["model"].update(lora={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
                        merge_lora=True)
    rundir = RunDir(tmp_path / "run")
    rundir.root.mkdir()
    rundir.config_path.write_text(yaml.safe_dump(old, sort_keys=False))
    return rundir


@pytest.mark.unit
def test_an_old_lora_run_directory_resumes_with_peft_names(tmp_path):
    """The recorded alpha / dropout are renamed and merge_lora dropped silently, so resuming with
    today's names finds no changed key; a changed field is named as model.lora.FIELD."""
    old = old_lora_run(tmp_path).recorded_config()
    assert old.model.lora == {"lora_alpha": 16, "lora_dropout": 0.0, "r": 8, "target_modules": ["q_proj", "v_proj"]}
    same = ["model.lora.r=8", "model.lora.lora_alpha=16", "model.lora.lora_dropout=0",
            "model.lora.target_modules=[q_proj, v_proj]"]
    check_resume(old, load_config(None, same), FINISHED, force=False)
    with pytest.raises(UserInputError, match=r"config key 'model.lora.r' changed \(8 -> 4\); stage 'generate'"):
        check_resume(old, load_config(None, [*same, "model.lora.r=4"]), FINISHED, force=False)


@pytest.mark.smoke
def test_the_mapping_reaches_peft(tiny_model_dir):
    """Every field reaches LoraConfig: a tiny random model under model.lora {r: 4, use_rslora: true,
    target_modules: [q_proj]} is a PeftModel with that config (and the default lora_alpha)."""
    from peft import PeftModel

    from ilrdpo.models import load_policy

    settings = load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.dtype=float32",
                                  "model.lora={r: 4, use_rslora: true, target_modules: [q_proj]}"]).model
    model, _, _ = load_policy(settings)
    assert isinstance(model, PeftModel)
    peft_config = model.peft_config["default"]
    assert (peft_config.r, peft_config.use_rslora, peft_config.lora_alpha) == (4, True, 32)
    assert peft_config.target_modules == {"q_proj"} and peft_config.task_type == "CAUSAL_LM"
    adapted = {name.split(".lora_A")[0].split(".")[-1] for name, _ in model.named_parameters() if "lora_A" in name}
    assert adapted == {"q_proj"}


@pytest.mark.slow
def test_peft_is_imported_only_with_model_lora():
    """peft takes seconds to import: `ilrdpo config-help` and a config without LoRA never load it."""
    code = ("import sys\nfrom ilrdpo import cli\nfrom ilrdpo.config import load_config\n"
            "sys.argv = ['ilrdpo', 'config-help']\ntry:\n    cli.main()\nexcept SystemExit:\n    pass\n"
            "load_config(None, ['loss.alpha=0.1'])\nassert 'peft' not in sys.modules, 'peft imported'\n"
            "load_config(None, ['model.lora.r=4'])\nassert 'peft' in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model.lora" in result.stdout and "lora_alpha 32" in result.stdout

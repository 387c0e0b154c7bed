"""The bad-input corpus (tests/bad_inputs/cases.yaml) through the real CLI: each case is one line
on stderr matching its pattern, its exit status (2), no traceback, nothing written where the
input was refused before sampling, and a finished run directory next to them unchanged byte
for byte.

Most cases call cli.main() in this process with sys.argv set (the console script's own code
path, without a second or more of interpreter start-up each); cases marked `subprocess: true`
go through the installed `ilrdpo` script to prove the entry point.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from helpers import call_main, console_script

TESTS = Path(__file__).resolve().parent
MANIFEST = yaml.safe_load((TESTS / "bad_inputs" / "cases.yaml").read_text())
CASES = MANIFEST["cases"]
BASES = MANIFEST["bases"]
PAIRS_FILE = TESTS.parent / "examples" / "pairs.jsonl"
SCORER_FILE = TESTS / "helpers" / "scorer.py"
KINDS = {"cli", "config", "override", "pairs", "prompts", "run", "model", "scorer", "evaluate"}


# --- the shared inputs: good files, tiny models, a finished run --------------------------------


def _copy_model_files(source: Path, target: Path, weights: bool) -> None:
    target.mkdir(parents=True)
    for path in source.iterdir():
        if weights or path.suffix != ".safetensors":
            shutil.copy2(path, target / path.name)


def _random_bytes(folder: Path, source: Path) -> None:
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)


def _truncated(folder: Path, source: Path) -> None:
    data = (source / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) - 1000])


def _bad_header(folder: Path, source: Path) -> None:
    header = b"{not json at all" + b" " * 48
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 64)


def _pickle_only(folder: Path, source: Path) -> None:
    from safetensors.torch import load_file

    torch.save(load_file(source / "model.safetensors"), folder / "pytorch_model.bin")


def _custom_code(folder: Path, source: Path) -> None:
    shutil.copy2(source / "model.safetensors", folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="ilrdpo_custom", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                        "AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))


def _config_corrupt(folder: Path, source: Path) -> None:
    shutil.copy2(source / "model.safetensors", folder / "model.safetensors")
    (folder / "config.json").write_text('{"model_type": "llama", ')


# name -> writes the weights (and config changes) into a copy of the tiny model's other files
MODEL_VARIANTS = {"random_bytes": _random_bytes, "truncated": _truncated, "bad_header": _bad_header,
                  "pickle_only": _pickle_only, "custom_code": _custom_code, "config_corrupt": _config_corrupt}


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below folder (the byte-for-byte check, lock included:
    a refused start never rewrites it)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def main_stderr(monkeypatch, capsys, argv: list[str]) -> tuple[int, str]:
    """cli.main() with sys.argv set; (exit status, stderr). An exception that escapes main() is a
    traceback the user would see: the test fails on it."""
    capsys.readouterr()
    try:
        status = call_main(monkeypatch, argv)
    except Exception as error:  # noqa: BLE001 - reported as what it is: an uncaught traceback
        pytest.fail(f"traceback escaped cli.main(): {type(error).__name__}: {error}")
    return status, capsys.readouterr().err


def fill(text: str, places: dict[str, str]) -> str:
    for name, value in places.items():
        text = text.replace("{" + name + "}", value)
    return text


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model_dir, tokenizer):
    """Placeholders of the corpus: good inputs, the tiny Llama, a 64-position GPT-2, and a finished
    one-iteration run built through the CLI (the directory every case must leave alone)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("corpus")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n"
                               for q in ("Name a colour.", "Say hello.", "Count to three.", "Name a fruit.")))
    gpt2 = root / "gpt2_64"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
                    ).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    places = {"model": str(tiny_model_dir), "gpt2": str(gpt2), "pairs": str(PAIRS_FILE), "prompts": str(prompts),
              "scorer": str(SCORER_FILE), "finished": str(root / "finished")}
    argv = [fill(a, {**places, "case": str(root)}) for a in BASES["run"]] + [f"output_dir={root / 'finished'}"]
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert call_main(monkeypatch, argv) == 0
    assert (root / "finished" / "iter_1" / "model" / "model.safetensors").is_file()
    return {"places": places, "finished": root / "finished", "finished_files": snapshot(root / "finished")}


def materialise(case: dict, folder: Path, corpus: dict, tiny_model_dir: Path) -> None:
    places = {**corpus["places"], "case": str(folder)}
    for name, spec in (case.get("files") or {}).items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(spec, str):
            path.write_text(fill(spec, places), encoding="utf-8")
        elif "hex" in spec:
            path.write_bytes(bytes.fromhex(spec["hex"].replace(" ", "")))
        elif "copy" in spec:
            shutil.copytree(corpus[spec["copy"]], path)
        else:
            variant = spec["model"]
            _copy_model_files(tiny_model_dir, path, weights=False)
            MODEL_VARIANTS[variant](path, tiny_model_dir)
    for name, mode in (case.get("chmod") or {}).items():
        os.chmod(folder / name, mode)


# --- the corpus --------------------------------------------------------------------------------


@pytest.mark.unit
def test_corpus_is_large_and_covers_every_kind():
    ids = [case["id"] for case in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    assert len(CASES) >= 60
    assert {case["kind"] for case in CASES} == KINDS
    assert sum(bool(case.get("subprocess")) for case in CASES) >= 4
    for case in CASES:
        assert set(case) <= {"id", "kind", "base", "argv", "files", "status", "message", "late", "subprocess",
                             "skip_if_root", "chmod"}, case["id"]


@pytest.mark.smoke
@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_bad_input_is_one_line_and_exit_2(case, corpus, tiny_model_dir, tmp_path, monkeypatch, capsys):
    if case.get("skip_if_root") and hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root may write to any folder")
    folder = tmp_path / "case"
    folder.mkdir()
    materialise(case, folder, corpus, tiny_model_dir)
    places = {**corpus["places"], "case": str(folder)}
    argv = [fill(str(a), places) for a in BASES.get(case.get("base"), []) + case["argv"]]
    monkeypatch.chdir(folder)
    if case.get("subprocess"):
        proc = subprocess.run(console_script() + argv, cwd=folder, capture_output=True, text=True, timeout=300,
                              env=os.environ.copy(), check=False)
        status, stderr = proc.returncode, proc.stderr
    else:
        status, stderr = main_stderr(monkeypatch, capsys, argv)
    for name in case.get("chmod") or {}:
        os.chmod(folder / name, 0o755)

    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    if case.get("late"):  # after sampling, stage timings and progress come first; the error is last
        lines = [line for line in lines if line.startswith("error")]
        assert stderr.rstrip().endswith(lines[-1] if lines else "error"), stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert status == case.get("status", 2), stderr
    assert lines[0].startswith("error: "), lines[0]
    assert re.search(case["message"], lines[0].removeprefix("error: ")), lines[0]
    if not case.get("late"):
        assert not (folder / "out").exists(), "refused input must not create the output folder"
    assert snapshot(corpus["finished"]) == corpus["finished_files"], "the finished run directory changed"


# --- the good side of the same checks ------------------------------------------------------------


@pytest.mark.unit
def test_version_prints_and_exits_0(monkeypatch, capsys):
    from ilrdpo import __version__

    status = call_main(monkeypatch, ["--version"])
    captured = capsys.readouterr()
    assert (status, captured.out, captured.err) == (0, f"ilrdpo {__version__}\n", "")


@pytest.mark.smoke
def test_pickle_checkpoint_loads_once_converted_as_the_refusal_says(tiny_model_dir, tmp_path):
    """The refusal says how to undo it: the conversion it names gives a folder that loads and
    computes what the safetensors original computes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ilrdpo.config import ModelSettings
    from ilrdpo.errors import UserInputError
    from ilrdpo.models import load_policy

    folder = tmp_path / "m"
    _copy_model_files(tiny_model_dir, folder, weights=False)
    _pickle_only(folder, tiny_model_dir)
    with pytest.raises(UserInputError, match="only a pickle checkpoint"):
        load_policy(ModelSettings(name_or_path=str(folder), dtype="float32"), torch.device("cpu"))
    converted = tmp_path / "converted"
    AutoModelForCausalLM.from_pretrained(folder, use_safetensors=False).save_pretrained(converted)
    AutoTokenizer.from_pretrained(folder).save_pretrained(converted)
    pickled, _, _ = load_policy(ModelSettings(name_or_path=str(converted), dtype="float32"), torch.device("cpu"))
    original, _, _ = load_policy(ModelSettings(name_or_path=str(tiny_model_dir), dtype="float32"),
                                 torch.device("cpu"))
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(pickled(ids).logits, original(ids).logits)


@pytest.mark.smoke
def test_sound_safetensors_pass_the_header_check(tiny_model_dir, tmp_path):
    """The header check accepts what save_pretrained writes, and finds one flipped size byte."""
    from ilrdpo.errors import UserInputError
    from ilrdpo.models import check_safetensors

    check_safetensors(tiny_model_dir / "model.safetensors")
    data = bytearray((tiny_model_dir / "model.safetensors").read_bytes())
    data[0] ^= 0x01  # header one byte longer than written: its JSON now ends inside the data
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(bytes(data))
    with pytest.raises(UserInputError, match="model.safetensors: (corrupt safetensors header|safetensors file is)"):
        check_safetensors(broken)

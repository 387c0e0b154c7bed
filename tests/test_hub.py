"""Model cards and hub uploads (smoke tier). The upload itself cannot run offline: the two
huggingface_hub calls are replaced by recorders, and the test checks what they were given."""

from __future__ import annotations

import json

import pytest
import yaml

from helpers import EXAMPLES, SCORER, call_main, first_lines
from ilrdpo.config import build_config
from ilrdpo.errors import UserInputError
from ilrdpo.hub import model_card
from ilrdpo.loop import run_iterations
from ilrdpo.offline import run_offline


@pytest.fixture
def uploads(monkeypatch) -> list[tuple[str, dict]]:
    from huggingface_hub import HfApi

    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        files = sorted(p.name for p in __import__("pathlib").Path(kwargs["folder_path"]).iterdir())
        calls.append(("upload_folder", {**kwargs, "files": files}))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def card_header(text: str) -> dict:
    return yaml.safe_load(text.split("---\n")[1])


def test_card_header_carries_what_the_hub_reads():
    text = model_card({"title": "t", "base_model": "Qwen/Qwen2.5-0.5B-Instruct", "datasets": ["trl-lib/x"],
                       "method": "LR-DPO (alpha=0.01)", "eval": [
                           {"iteration": 0, "alpha": None, "length": {"tokens_mean": 40.0}, "quality_mean": 0.7},
                           {"iteration": 1, "alpha": 0.01, "length": {"tokens_mean": 38.5}, "quality_mean": 0.75,
                            "vs_initial": {"win_rate": 61.0, "lc_win_rate": 63.2}}]})
    header = card_header(text)
    assert header["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct" and header["datasets"] == ["trl-lib/x"]
    assert header["library_name"] == "transformers" and "ilrdpo" in header["tags"]
    assert "| 1 | 0.01 | 38.5 | 0.7500 | 61.0 | 63.2 |" in text
    assert "base_model" not in card_header(model_card({"base_model": "/local/folder"}))


def test_train_uploads_the_saved_model(tiny_model_dir, tmp_path, uploads):
    out = tmp_path / "run"
    config = build_config({"model": {"name_or_path": str(tiny_model_dir), "dtype": "float32",
                                     "push_to_hub": "me/tiny-lr-dpo"},
                           "data": {"pairs": str(first_lines(EXAMPLES / "pairs.jsonl", 2, tmp_path))},
                           "train": {"batch_size": 2, "max_length": 128}, "output_dir": str(out)})
    run_offline(config)
    (create, repo), (upload, args) = uploads
    assert (create, repo["repo_id"], repo["exist_ok"]) == ("create_repo", "me/tiny-lr-dpo", True)
    assert upload == "upload_folder" and args["repo_id"] == "me/tiny-lr-dpo"
    assert args["folder_path"] == str(out / "model")
    assert {"README.md", "model.safetensors", "config.json", "tokenizer.json"} <= set(args["files"])


def test_run_uploads_the_final_model_with_its_eval_table(tiny_model_dir, tmp_path, uploads):
    prompts, evals = tmp_path / "p.jsonl", tmp_path / "e.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ["Say hi.", "Name a colour.", "Count."]))
    evals.write_text(json.dumps({"prompt": "What is ice?"}) + "\n")
    out = tmp_path / "run"
    run_iterations(build_config({
        "model": {"name_or_path": str(tiny_model_dir), "dtype": "float32", "push_to_hub": "me/tiny-ilrdpo"},
        "data": {"prompts": str(prompts), "eval_prompts": str(evals)},
        "generation": {"num_samples": 2, "max_new_tokens": 4, "temperature": 1.0},
        "scoring": {"type": "python", "function": f"{SCORER}:char_count"}, "pairing": {"skip_truncated": False},
        "train": {"max_length": 64}, "iterations": {"count": 1}, "eval": {"length_anchors": False},
        "output_dir": str(out)}))
    assert [name for name, _ in uploads] == ["create_repo", "upload_folder"]
    assert uploads[1][1]["folder_path"] == str(out / "iter_1" / "model")
    card = (out / "iter_1" / "model" / "README.md").read_text()
    assert "## Evaluation (per iteration, eval prompts)" in card and "\n| 1 | 0 |" in card


def test_bad_repo_id_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(UserInputError, match="'model.push_to_hub': 'not a repo' is not a hub repository id"):
        run_offline(build_config({"model": {"push_to_hub": "not a repo"},
                                  "data": {"pairs": str(EXAMPLES / "pairs.jsonl")}, "output_dir": str(tmp_path / "o")}))
    assert not (tmp_path / "o").exists()


# --- a hub model on a machine without the hub ----------------------------------------------------


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """No HF_HUB_OFFLINE, an empty hub cache and a hub endpoint that refuses connections: what an
    offline machine meets (the connection is really tried and really fails)."""
    from huggingface_hub import constants

    from ilrdpo.hub import hub_reachable

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for proxy in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub_reachable.cache_clear()
    yield tmp_path / "hub"
    hub_reachable.cache_clear()


MISSING = "ilrdpo-test/not-on-this-machine"
COMMANDS = {"generate": ["--model", MISSING, "--prompts", "{p}", "--out", "{o}"],
            "chat": ["--model", MISSING], "evaluate": ["--model", MISSING, "--prompts", "{p}"],
            "run": [f"model.name_or_path={MISSING}", "data.prompts={p}", "output_dir={o}"],
            "train": [f"--model_name_or_path={MISSING}", "data.pairs={p}", "output_dir={o}"]}


@pytest.mark.unit
@pytest.mark.parametrize("command", COMMANDS)
def test_a_hub_model_that_is_not_here_without_a_hub_is_one_line_at_once(unreachable_hub, monkeypatch, capsys,
                                                                        tmp_path, command):
    import time

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n')
    args = [a.format(p=prompts, o=tmp_path / "out") for a in COMMANDS[command]]
    start = time.monotonic()
    code = call_main(monkeypatch, [command, *args])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err.strip().splitlines()
    where = "config key 'model.name_or_path'" if command in ("run", "train") else "option '--model'"
    assert code == 2 and elapsed < 5 and len(err) == 1
    assert err[0].startswith(f"error: {where}: model '{MISSING}' is not a folder here nor in the local hub cache")
    assert "cannot be reached" in err[0] and "local model folder" in err[0] and "bundled:" in err[0]


@pytest.mark.smoke
def test_a_cached_hub_model_loads_without_retries_when_the_hub_is_unreachable(unreachable_hub, monkeypatch,
                                                                             tiny_model_dir, tmp_path):
    """The model is in the hub cache (laid out as huggingface_hub writes it): it loads from there
    at once, where huggingface_hub's retries would first spend about a minute."""
    import shutil
    import time

    from huggingface_hub import constants

    repo = unreachable_hub / "models--ilrdpo-test--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n')
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # restored after the test: go_offline sets it
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    start = time.monotonic()
    code = call_main(monkeypatch, ["generate", "--model", "ilrdpo-test/tiny", "--prompts", str(prompts),
                                   "--out", str(tmp_path / "o.jsonl"), "--num-samples", "1", "--max-new-tokens", "2"])
    assert code == 0 and time.monotonic() - start < 20
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 1

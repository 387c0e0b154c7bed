"""The report stage on real run directories: two iterations of the loop on a tiny random Llama.

The runs are built once per module (about 20 s on one CPU core for both): one with eval prompts
and one without. Variants (a second run with edited numbers, a run cut short, a corrupt file)
are copies of the first, so every case is a directory `ilrdpo run` could have left behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ilrdpo.config import build_config
from ilrdpo.errors import UserInputError
from ilrdpo.evaluation.report import joint_win_rates, print_tables, summary_rows, write_report
from ilrdpo.evaluation.rundata import load_run
from ilrdpo.loop import run_iterations
from ilrdpo.progress import console

os.environ["ILRDPO_QUIET"] = "1"

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOT_FILES = ("reward_winrate.png", "length.png", "reward_vs_length.png", "length_hist.png", "alpha.png",
              "training.png")
SCORER = """
def score(prompts, responses):
    # distinct words reward variety; the small length term breaks ties between equal counts
    return [len(set(r.split())) + 0.01 * len(r) for r in responses]
"""


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _build_run(root: Path, model_dir: Path, with_eval: bool) -> Path:
    (root / "scorer.py").write_text(SCORER)
    train = _write_jsonl(root / "train.jsonl", [
        {"id": f"t{i}", "prompt": f"Name a colour, number {i}.", "reference": "Blue is a colour."}
        for i in range(6)])
    evals = _write_jsonl(root / "eval.jsonl", [
        {"id": f"e{i}", "prompt": f"Describe the sky, case {i}.", "reference": "The sky is blue today."}
        for i in range(4)])
    config = build_config({
        "model": {"name_or_path": str(model_dir)},
        "data": {"prompts": str(train), "eval_prompts": str(evals) if with_eval else None},
        "scoring": {"type": "python", "function": f"{root / 'scorer.py'}:score"},
        "generation": {"max_new_tokens": 8, "num_samples": 2, "temperature": 1.0},
        "pairing": {"skip_truncated": False},
        "train": {"batch_size": 4, "max_length": 256},
        "iterations": {"count": 2},
        "output_dir": str(root / "run"),
    })
    run_iterations(config)
    return root / "run"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir) -> Path:
    return _build_run(tmp_path_factory.mktemp("report_run"), tiny_model_dir, with_eval=True)


@pytest.fixture(scope="module")
def no_eval_run_dir(tmp_path_factory, tiny_model_dir) -> Path:
    return _build_run(tmp_path_factory.mktemp("report_run_no_eval"), tiny_model_dir, with_eval=False)


def _copy_run(run_dir: Path, dst: Path) -> Path:
    # The saved models are not read by the report; leaving them out keeps the copy small.
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("model"))
    return dst


def _eval(run_dir: Path, k: int) -> dict:
    return json.loads((run_dir / f"iter_{k}" / "eval.json").read_text())


def _results_table(report_text: str) -> list[dict[str, str]]:
    """The rows of the markdown results table as {header: cell}."""
    section = report_text.split("## Results per iteration")[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    split = lambda line: [cell.strip() for cell in line.strip().strip("|").split("|")]
    header = split(lines[0])
    return [dict(zip(header, split(line))) for line in lines[2:]]


def _number(cell: str) -> float:
    return float(cell.split(" ")[0].rstrip("†‡"))


def _check_png(path: Path) -> None:
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] > 200 and image.size[1] > 200


# --- one finished run ----------------------------------------------------------------------------


def test_load_run_reads_every_stage(run_dir):
    run = load_run(run_dir)
    assert run.name == "run"
    assert run.config["iterations"]["count"] == 2 and run.config["loss"]["alpha"] == 0.0
    assert sorted(run.evals) == [0, 1, 2] and sorted(run.answers) == [0, 1, 2]
    assert sorted(run.candidates) == [1, 2] and sorted(run.metrics) == [1, 2]
    assert len(run.answers[0]) == 4 and len(run.candidates[1]) == 6
    # state.json also plans alpha for iteration 3, which never ran: not an iteration of the run
    assert run.alpha == {1: 0.0, 2: 0.0}
    assert run.missing == []


def test_summary_rows_are_the_eval_json_values(run_dir):
    rows = summary_rows(load_run(run_dir))
    assert [row["iteration"] for row in rows] == [0, 1, 2]
    for row in rows:
        ev = _eval(run_dir, row["iteration"])
        assert row["reward"] == ev["reward_mean"] and row["quality"] == ev["quality_mean"]
        assert row["length_tokens"] == ev["length"]["tokens_mean"] and row["source"] == "eval"
        if row["iteration"] == 0:
            assert row["win_rate"] is None and row["pairs"] is None and row["alpha"] is None
            continue
        assert row["win_rate"] == ev["vs_initial"]["win_rate"]
        assert row["win_rate_ci"] == ev["vs_initial"]["win_rate_ci"]
        assert row["lc_win_rate"] == ev["vs_initial"]["lc_win_rate"]
        assert row["quality_win_rate"] == ev["vs_initial_quality"]["win_rate"]
        state = json.loads((run_dir / "state.json").read_text())
        assert row["pairs"] == ev["pairs/count"] and row["alpha"] == state["alpha"][str(row["iteration"])]


def test_write_report_tables_and_plots(run_dir, tmp_path):
    report = write_report([run_dir], tmp_path / "out")
    assert report == tmp_path / "out" / "report.md"
    text = report.read_text()
    assert text.startswith("# ")
    for name in PLOT_FILES:
        assert f"](plots/{name})" in text
        _check_png(tmp_path / "out" / "plots" / name)
    table = _results_table(text)
    assert [row["iteration"] for row in table] == ["0", "1", "2"]
    run = load_run(run_dir)
    joint = joint_win_rates([run])  # the report refits all iterations jointly (not eval.json's LC)
    for row in table:
        ev = _eval(run_dir, int(row["iteration"]))
        assert _number(row["reward"]) == pytest.approx(ev["reward_mean"], rel=1e-3)
        assert _number(row["quality"]) == pytest.approx(ev["quality_mean"], rel=1e-3)
        assert _number(row["mean length (tokens)"]) == pytest.approx(ev["length"]["tokens_mean"], abs=0.05)
        if row["iteration"] != "0":
            vs = ev["vs_initial"]
            lo, hi = vs["win_rate_ci"]
            assert row["win rate vs initial [95% CI]"] == f"{vs['win_rate']:.1f} [{lo:.1f}, {hi:.1f}]"
            fit = joint[(run.name, int(row["iteration"]))]["reward"]
            lc_lo, lc_hi = fit["lc_ci"]
            assert row["LC win rate vs initial [95% CI]"].rstrip("‡") == (
                f"{fit['lc_win_rate']:.1f} [{lc_lo:.1f}, {lc_hi:.1f}]")
            assert _number(row["quality win rate vs initial"]) == pytest.approx(
                ev["vs_initial_quality"]["win_rate"], abs=0.05)
            assert int(row["pairs"]) == ev["pairs/count"]
    assert "## Text metrics" in text and "distinct_1" in text
    assert "## Missing" in text and "Nothing is missing." in text
    notes = {joint[(run.name, k)]["reward"]["lc_note"] for k in (1, 2)}
    for note in notes - {None}:
        assert note in text  # every LC caveat reaches the reader


def test_rewriting_a_report_replaces_it(run_dir, tmp_path):
    first = write_report([run_dir], tmp_path).read_text()
    assert write_report([run_dir], tmp_path).read_text() == first


# --- several runs side by side -------------------------------------------------------------------


def test_two_runs_share_one_table(run_dir, tmp_path):
    other = _copy_run(run_dir, tmp_path / "ilr")
    for k in (1, 2):
        ev = _eval(other, k)
        ev.update(reward_mean=10.0 + k, quality_mean=9.0 + k, alpha=0.5)  # a stale copy: state.json's counts
        ev["length"]["tokens_mean"] = 7.0 - k
        ev["vs_initial"].update(win_rate=60.0 + k, win_rate_ci=[40.0, 80.0], lc_win_rate=70.0 + k,
                                lc_identifiable=True, lc_note=None)
        (other / f"iter_{k}" / "eval.json").write_text(json.dumps(ev))
    state = json.loads((other / "state.json").read_text())
    state["alpha"] = {"1": 0.05, "2": 0.1}
    (other / "state.json").write_text(json.dumps(state))
    text = write_report([run_dir, other], tmp_path / "out", names=["vanilla DPO", "iLR-DPO"]).read_text()
    assert text.count("## Results per iteration") == 1
    table = _results_table(text)
    assert [row["run"] for row in table] == ["vanilla DPO"] * 3 + ["iLR-DPO"] * 3
    edited = {row["iteration"]: row for row in table if row["run"] == "iLR-DPO"}
    assert _number(edited["2"]["reward"]) == 12.0 and _number(edited["2"]["quality"]) == 11.0
    assert edited["1"]["alpha"] == "0.05"
    # both runs share model 0's answers, so one joint fit covers all four iterates and win rates
    # are refitted from the answers: the copy's answers are the same, so are its win-rate cells
    # (the edited eval.json win rates are not used)
    original = {row["iteration"]: row for row in table if row["run"] == "vanilla DPO"}
    for k in ("1", "2"):
        for column in ("win rate vs initial [95% CI]", "LC win rate vs initial [95% CI]"):
            assert edited[k][column] == original[k][column]
    for name in PLOT_FILES:
        _check_png(tmp_path / "out" / "plots" / name)


def test_same_folder_names_are_told_apart(run_dir, tmp_path):
    other = _copy_run(run_dir, tmp_path / "elsewhere" / "run")
    table = _results_table(write_report([run_dir, other], tmp_path / "out").read_text())
    assert {row["run"] for row in table} == {"run", "run (2)"}


def test_print_tables_shows_both_runs(run_dir):
    with console.capture() as captured:
        print_tables([load_run(run_dir, "vanilla"), load_run(run_dir, "second")])
    out = captured.get()
    assert "vanilla" in out and "second" in out
    assert f"{_eval(run_dir, 2)['vs_initial']['win_rate']:.1f}" in out


# --- runs with parts missing ---------------------------------------------------------------------


def test_run_in_progress_lists_what_is_missing(run_dir, tmp_path):
    partial = _copy_run(run_dir, tmp_path / "partial")
    shutil.rmtree(partial / "iter_2")
    (partial / "iter_1" / "eval.json").unlink()
    run = load_run(partial)
    assert any(item.startswith("iter_2/") for item in run.missing)
    assert any(item.startswith("iter_1/eval.json") for item in run.missing)
    text = write_report([partial], tmp_path / "out").read_text()
    table = _results_table(text)
    assert [row["iteration"] for row in table] == ["0", "1"]
    # iteration 1's eval answers survive the lost eval.json: their means stand in for it, and the
    # win rates are refitted from them
    answers = run.answers[1]
    assert _number(table[1]["reward"]) == pytest.approx(sum(a["reward"] for a in answers) / len(answers),
                                                        rel=1e-3)
    assert _number(table[1]["mean length (tokens)"]) == pytest.approx(
        sum(a["n_tokens"] for a in answers) / len(answers), abs=0.05)
    fit = joint_win_rates([run])[(run.name, 1)]["reward"]
    assert table[1]["win rate vs initial [95% CI]"].startswith(f"{fit['win_rate']:.1f} [")
    assert table[1]["pairs"] == str(run.pairs_count[1])
    missing = text.split("## Missing")[1]
    assert "iter_2/: iteration 2 has not run yet" in missing and "iter_1/eval.json" in missing


def test_unreadable_file_is_reported_not_raised(run_dir, tmp_path):
    broken = _copy_run(run_dir, tmp_path / "broken")
    (broken / "iter_2" / "eval.json").write_text("{not json")
    text = write_report([broken], tmp_path / "out").read_text()
    assert "iter_2/eval.json: unreadable" in text.split("## Missing")[1]


def test_run_without_eval_prompts(no_eval_run_dir, tmp_path):
    run = load_run(no_eval_run_dir)
    assert run.evals and not run.answers and 0 not in run.evals
    rows = summary_rows(run)
    # model k's lengths come from the samples it drew in round k+1; the last model drew none
    assert [row["iteration"] for row in rows] == [0, 1, 2]
    lengths = [n for c in run.candidates[1] for n in c["n_tokens"]]
    rewards = [x for c in run.candidates[2] for x in c["rewards"]]
    assert rows[0]["length_tokens"] == pytest.approx(sum(lengths) / len(lengths))
    assert rows[1]["reward"] == pytest.approx(sum(rewards) / len(rewards))
    assert rows[0]["source"] == "samples" and rows[2]["length_tokens"] is None and rows[2]["reward"] is None
    assert all(row["win_rate"] is None and row["lc_win_rate"] is None for row in rows)
    assert [row["pairs"] for row in rows[1:]] == [_eval(no_eval_run_dir, k)["pairs/count"] for k in (1, 2)]
    text = write_report([no_eval_run_dir], tmp_path / "out").read_text()
    missing = text.split("## Missing")[1]
    assert "eval prompts: none configured" in missing
    assert _results_table(text)[0]["mean length (tokens)"].endswith("†")
    for name in PLOT_FILES:  # the reward panel shows the samples' reward; the win-rate panel is empty
        assert f"](plots/{name})" in text
        _check_png(tmp_path / "out" / "plots" / name)


def test_mixed_runs_render_together(run_dir, no_eval_run_dir, tmp_path):
    text = write_report([run_dir, no_eval_run_dir], tmp_path / "out", names=["eval", "no eval"]).read_text()
    assert {row["run"] for row in _results_table(text)} == {"eval", "no eval"}
    assert "no eval: eval prompts: none configured" in text


def test_not_a_run_directory(tmp_path):
    with pytest.raises(UserInputError, match="not a run directory"):
        load_run(tmp_path)
    with pytest.raises(UserInputError, match="names"):
        write_report([tmp_path], tmp_path / "out", names=["a", "b"])


def test_terminal_table_fits_80_columns(run_dir, monkeypatch):
    from ilrdpo.evaluation.report import print_tables

    monkeypatch.setattr(console, "width", 80)
    with console.capture() as captured:
        print_tables([load_run(run_dir), load_run(run_dir, name="again")])
    lines = captured.get().splitlines()
    assert lines and max(len(line) for line in lines) <= 80
    assert any("report.md" in line for line in lines)  # where the intervals went


@pytest.mark.unit
def test_the_report_refits_with_the_judges_tie_tolerance():
    """With eval.judge set, the evaluate stage ties rewards within the judge's tie_tolerance; the
    report's joint refit must use the same rule (it once read scoring.tie_tolerance alone, so
    report.md and eval.json disagreed). Model 1 beats model 0 by 0.01 on every prompt: within the
    judge's tolerance 0.05 every prompt is a tie, 50%."""
    from ilrdpo.decisions import judge_tie_tolerance
    from ilrdpo.evaluation.rundata import RunData

    def answers(reward):
        return [{"id": f"p{i}", "response": f"answer {i}", "n_tokens": 10 + i, "n_chars": 50 + i,
                 "reward": reward + i, "quality": reward + i} for i in range(6)]

    config = {"scoring": {"tie_tolerance": 0.0}, "eval": {"judge": {"type": "python", "tie_tolerance": 0.05}},
              "data": {"eval_prompts": "eval.jsonl"}}
    run = RunData(name="r", path=Path("r"), config=config, answers={0: answers(0.0), 1: answers(0.01)},
                  evals={0: {}, 1: {}}, dirs={0: Path("r/0"), 1: Path("r/1")})
    assert judge_tie_tolerance(config["eval"]["judge"], config["scoring"]) == 0.05
    fitted = joint_win_rates([run])[("r", 1)]
    assert fitted["reward"]["win_rate"] == 50.0 and fitted["reward"]["ties"] == 6


def test_an_ipo_run_explains_its_loss_curve(run_dir, tmp_path):
    """IPO's loss rising with pair accuracy 0 was left unexplained: the training section says why."""
    import yaml

    run = _copy_run(run_dir, tmp_path / "ipo")
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert "IPO (loss.type ipo)" not in write_report([run], tmp_path / "sigmoid").read_text()
    config["loss"]["type"] = "ipo"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    training = write_report([run], tmp_path / "out").read_text().split("## Training")[1]
    assert "IPO (loss.type ipo) pulls each pair's margin" in training and "reversed share" in training

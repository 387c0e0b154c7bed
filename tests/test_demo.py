"""The offline demo: bundled data and the multi-seed study's arithmetic (fast), the quick demo end to
end (slow, CI runs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from ilrdpo.demo import ARMS, bundled_prompts, demo_configs, shared_stages
from ilrdpo.demo.study import check_claim, study_table
from ilrdpo.evaluation.plots import plot_bands
from ilrdpo.records import read_prompts
from ilrdpo.rundir import RunDir

PNG = b"\x89PNG\r\n\x1a\n"


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


@pytest.mark.smoke  # reads the bundled prompts
def test_bundled_prompts_are_split_and_carry_references():
    train, held_out = read_prompts(bundled_prompts("train")), read_prompts(bundled_prompts("eval"))
    assert len(train) + len(held_out) >= 300 and len(held_out) >= 60
    assert all(p.reference for p in train + held_out)
    assert not {_normalise(p.prompt) for p in train} & {_normalise(p.prompt) for p in held_out}


@pytest.mark.smoke  # reads the bundled prompts
def test_second_held_out_set_is_new_and_has_references():
    second = read_prompts(bundled_prompts("heldout"))
    assert len(second) >= 100 and all(p.reference for p in second)
    assert len({p.id for p in second}) == len(second)
    seen = {_normalise(p.prompt) for split in ("train", "eval") for p in read_prompts(bundled_prompts(split))}
    assert not seen & {_normalise(p.prompt) for p in second}


@pytest.mark.smoke  # reads the bundled prompts
def test_demo_arms_differ_only_in_the_length_margin(tmp_path):
    configs = demo_configs(tmp_path, quick=True)
    idpo, ilrdpo = configs["idpo"].model_dump(), configs["ilrdpo"].model_dump()
    assert idpo["loss"]["alpha"] == 0.0 and ilrdpo["loss"]["alpha"] > 0
    assert idpo["iterations"].pop("alpha_control")["budget"] is None  # vanilla: alpha stays 0
    ilrdpo["iterations"].pop("alpha_control")
    idpo_loss, ilrdpo_loss = idpo.pop("loss"), ilrdpo.pop("loss")
    assert {key for key in idpo_loss if idpo_loss[key] != ilrdpo_loss[key]} <= {"alpha", "target_length"}
    assert idpo.pop("output_dir") != ilrdpo.pop("output_dir")
    assert idpo == ilrdpo
    # the eval prompts are never trained on
    train = {p.id for p in read_prompts(configs["idpo"].data.prompts)}
    assert not train & {p.id for p in read_prompts(configs["idpo"].data.eval_prompts)}


@pytest.mark.smoke  # reads the bundled prompts
def test_study_arms_are_overrides(tmp_path):
    arms = {**ARMS, "rel2": ["loss.target_length=base", "loss.alpha=2"]}
    configs = demo_configs(tmp_path, quick=True, arms=arms, sizes={"iterations": 1, "n_eval": 5})
    assert list(configs) == list(arms)
    assert configs["rel2"].loss.target_length == "base" and configs["rel2"].loss.alpha == 2
    assert configs["idpo"].iterations.count == 1
    assert len(read_prompts(configs["rel2"].data.eval_prompts)) == 5


@pytest.mark.parametrize("pairs", [True, False])
def test_first_iteration_shares_pairs_only_when_asked(tmp_path, pairs):
    """Pairs carry per-prompt length targets: an arm with another target setting pairs again."""
    source, target = tmp_path / "idpo", tmp_path / "ilrdpo"
    for name, text in (("iter_0/eval.json", "{}"), ("iter_1/candidates.jsonl", "c\n"), ("iter_1/pairs.jsonl", "p\n")):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(text)
    RunDir(target).adopt(RunDir(source), shared_stages(pairs=pairs))
    assert (target / "iter_1" / "candidates.jsonl").read_text() == "c\n"
    assert (target / "iter_1" / "pairs.jsonl").exists() == pairs
    finished = json.loads((target / "state.json").read_text())["finished"]
    assert finished == {"0": ["eval"], "1": ["generate", "score", *(["pair"] if pairs else [])]}


def _rows(method_lengths, vanilla_lengths, method_quality, vanilla_quality):
    """Two seeds, base length 40 and quality 0.70 on both; values per iteration 1..2 per seed."""
    rows = []
    for seed in (0, 1):
        for arm in ("idpo", "ilrdpo"):
            rows.append({"arm": arm, "seed": seed, "iteration": 0, "eval_length": 40.0, "eval_quality": 0.70})
        for k in (1, 2):
            rows.append({"arm": "ilrdpo", "seed": seed, "iteration": k, "eval_length": method_lengths[seed][k - 1],
                         "eval_quality": method_quality})
            rows.append({"arm": "idpo", "seed": seed, "iteration": k, "eval_length": vanilla_lengths[seed][k - 1],
                         "eval_quality": vanilla_quality})
    return rows


def test_claim_holds_within_the_length_limits():
    """iLR-DPO at 44 and 36 tokens (+10%, -10% of 40) on both seeds: mean 0%, worst seed 10%;
    vanilla at 60 (+50%); quality 0.72 >= base 0.70 and >= vanilla 0.71."""
    rows = _rows({0: [44, 44], 1: [36, 36]}, {0: [60, 60], 1: [60, 60]}, 0.72, 0.71)
    assert check_claim(rows, "eval") == [f"eval iter {k}: 2 seed(s), the claim needs 3" for k in (1, 2)]


def test_claim_names_each_failure():
    """Seed 0 at 54 tokens (+35%) breaks the per-seed 25% limit; the mean (54 + 44) / 2 = 49 is
    +22.5%, over 15%; vanilla at 48 (+20%) is under 25% growth; quality 0.69 < base 0.70 and
    < vanilla 0.71."""
    rows = _rows({0: [54, 54], 1: [44, 44]}, {0: [48, 48], 1: [48, 48]}, 0.69, 0.71)
    failures = check_claim(rows, "eval")
    text = "\n".join(failures)
    assert "mean quality 0.6900 < base 0.7000" in text
    assert "iter 1: iLR-DPO mean length +22% of base" in text or "+23%" in text
    assert "a seed's iLR-DPO length +35%" in text
    assert "iLR-DPO quality 0.6900 < vanilla 0.7100" in text
    assert "vanilla length only +20%" in text
    assert len(failures) == 1 + 2 * 5


def test_study_table_gives_mean_and_range():
    rows = _rows({0: [44, 44], 1: [36, 36]}, {0: [60, 60], 1: [60, 60]}, 0.72, 0.71)
    table = "\n".join(study_table(rows, ["idpo", "ilrdpo"]))
    assert "| base | 0 | 2 | 40.0 (40.0..40.0) |" in table
    assert "| iLR-DPO | 1 | 2 | 40.0 (36.0..44.0) | 0.7200 (0.7200..0.7200) |" in table
    assert table.count("| base |") == 1


def test_study_shows_sampled_answers_only_when_there_are_some():
    """Rows with sampled eval numbers (experimental.eval_samples) get sampled columns and their own claim check;
    rows without them (the default) do not."""
    rows = _rows({0: [44, 44], 1: [36, 36]}, {0: [60, 60], 1: [60, 60]}, 0.72, 0.71)
    assert "sampled" not in "\n".join(study_table(rows, ["idpo", "ilrdpo"]))
    assert check_claim(rows, "sampled") == ["sampled: no numbers"]
    for row in rows:  # sampled answers 10% longer, quality 0.01 lower than the greedy ones
        row["sampled_length"], row["sampled_quality"] = row["eval_length"] * 1.1, row["eval_quality"] - 0.01
    table = "\n".join(study_table(rows, ["idpo", "ilrdpo"]))
    assert "| sampled length | sampled quality |" in table
    assert "| iLR-DPO | 1 | 2 | 40.0 (36.0..44.0) | 0.7200 (0.7200..0.7200) | - | 44.0 (39.6..48.4) | 0.7100" in table
    assert check_claim(rows, "sampled") == [f"sampled iter {k}: 2 seed(s), the claim needs 3" for k in (1, 2)]


def test_paired_differences_prompt_by_prompt(tmp_path):
    """Two seeds x 4 prompts. Iteration 1: the method is 0.05 better on every prompt of both seeds
    (mean +0.05, every resample +0.05, so the interval is that point). Iteration 2: +0.1 and -0.1
    on alternate prompts (mean 0): not distinguishable. Held-out answers absent: no rows."""
    from ilrdpo.demo.study import paired_differences, paired_table

    for seed in (0, 1):
        for arm, shift in (("idpo", 0.0), ("ilrdpo", 1.0)):
            for k, deltas in ((1, [0.05] * 4), (2, [0.1, -0.1, 0.1, -0.1])):
                path = tmp_path / f"seed_{seed}" / arm / f"iter_{k}" / "eval_answers.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("".join(json.dumps({"id": f"p{i}", "quality": 0.5 + 0.01 * i + shift * d}) + "\n"
                                        for i, d in enumerate(deltas)))
    rows = paired_differences(tmp_path, [0, 1], "eval")
    assert [(r["iteration"], r["seeds"], r["prompts"]) for r in rows] == [(1, 2, 4), (2, 2, 4)]
    assert rows[0]["mean"] == pytest.approx(0.05) and rows[0]["ci"] == pytest.approx([0.05, 0.05])
    assert rows[1]["mean"] == pytest.approx(0.0, abs=1e-12) and rows[1]["ci"][0] < 0 < rows[1]["ci"][1]
    table = "\n".join(paired_table(rows))
    assert "| 1 | 2 x 4 | +0.0500 | [+0.0500, +0.0500] | iLR-DPO higher |" in table
    assert "not distinguishable" in table
    assert paired_differences(tmp_path, [0, 1], "heldout") == []


def test_plot_bands_draws_a_png(tmp_path):
    bands = {"idpo": {0: [40, 42], 1: [60, 80]}, "ilrdpo": {0: [40, 42], 1: [38, 45]}}
    assert plot_bands({"length": bands, "empty": {"idpo": {}}}, tmp_path / "b.png", title="t")
    assert (tmp_path / "b.png").read_bytes()[:8] == PNG
    assert not plot_bands({"empty": {"idpo": {}}}, tmp_path / "none.png")


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    """`ilrdpo demo --quick`: both arms, the second held-out set, a report with its table and
    plots. Its wall time is printed (pytest -s, or the durations table), not asserted: this
    project measures time in benchmarks, never in a timed test."""
    env = {**os.environ, "ILRDPO_QUIET": "1", "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ilrdpo.cli", "demo", "--quick", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=1800, check=False)
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    assert "vanilla" in report and "iLR-DPO" in report and "cannot show the effect" in report
    pngs = sorted((tmp_path / "plots").glob("*.png"))
    assert pngs, "the report drew no plots"
    for png in pngs:
        assert png.read_bytes()[:8] == PNG
        assert f"plots/{png.name}" in report
    for arm in ("idpo", "ilrdpo"):
        state = json.loads((tmp_path / arm / "state.json").read_text())
        assert all("eval" in stages for stages in state["finished"].values())
        assert (tmp_path / arm / "iter_2" / "eval.json").exists()
        if (os.cpu_count() or 1) >= 2:  # the arms ran in parallel, one process and log each
            assert "iter 2 train" in (tmp_path / arm / "demo.log").read_text()
        held_out = json.loads((tmp_path / arm / "heldout" / "iter_2.json").read_text())
        assert held_out["text"]["rougeL"] is not None
    # iteration 1's samples are shared: the same base model, prompts and seed
    same = [(tmp_path / arm / "iter_1" / "pairs.jsonl").read_text() for arm in ("idpo", "ilrdpo")]
    assert same[0] == same[1]
    # the per-stage times close the output, with the threads each part used (arms x threads = cores)
    printed = " ".join(done.stderr.split())  # the console writes to stderr
    assert "time per stage (s; threads: shared first steps " in printed, done.stderr[-2000:]
    assert "  vanilla: " in done.stderr and "held-out set" in printed
    threads = json.loads((tmp_path / "threads.json").read_text())
    assert threads["idpo"] * 2 <= max(threads["shared first steps"], 2)
    print(f"ilrdpo demo --quick: {elapsed:.0f} s")


@pytest.mark.unit
def test_stage_lines_sum_each_arms_stages_by_kind(tmp_path):
    """iter 1 train 10 s + iter 2 train 5 s = train 15; the held-out pass and the demo's own stages as recorded."""
    from ilrdpo.demo.arms import stage_lines

    (tmp_path / "idpo").mkdir()
    (tmp_path / "idpo" / "timings.json").write_text(json.dumps(
        {"load scorer": 0.1, "iter 1 train": 10.0, "iter 1 eval": 2.0, "iter 2 generate": 7.0, "iter 2 train": 5.0,
         "held-out set": 3.0}))
    lines = stage_lines(tmp_path, ["idpo", "ilrdpo"], {"shared first steps": 20.4, "report": 1.0},
                        {"shared first steps": 2, "idpo": 1, "ilrdpo": 1})
    assert lines == ["time per stage (s; threads: shared first steps 2, idpo 1, ilrdpo 1)",
                     "  shared first steps: 20", "  report: 1",
                     "  vanilla: generate 7, train 15, eval 2, held-out set 3"]  # ilrdpo/ has no timings yet


@pytest.mark.smoke  # one arm process
def test_an_arm_that_fails_in_its_process_ends_in_one_line_naming_it(tmp_path):
    """The arms run one process each: a bad input in one (here its prompts file is gone) comes
    back as one UserInputError line naming the arm and the file; the arm's log keeps the rest."""
    from ilrdpo.demo import run_parallel
    from ilrdpo.errors import UserInputError

    config = demo_configs(tmp_path, quick=True)["ilrdpo"]
    broken = config.model_copy(update={"data": config.data.model_copy(update={"prompts": str(tmp_path / "gone.jsonl")})})
    with pytest.raises(UserInputError) as error:
        run_parallel({"ilrdpo": (broken.model_dump_json(), None, None)}, tmp_path, threads=1)
    message = str(error.value)
    assert message.startswith("arm ilrdpo: ") and "gone.jsonl" in message and "\n" not in message
    assert "gone.jsonl" in (tmp_path / "ilrdpo" / "demo.log").read_text()


def _demo_cli(monkeypatch, args: list[str]) -> tuple[int, list]:
    """`ilrdpo demo ARGS` in-process with the runs replaced by a recorder."""
    import ilrdpo.demo
    from ilrdpo import cli

    calls: list = []
    monkeypatch.setattr(ilrdpo.demo, "run_study", lambda out, seeds, **kw: calls.append(("study", seeds, kw)))
    monkeypatch.setattr(ilrdpo.demo, "run_demo", lambda out, **kw: calls.append(("demo", kw["seed"], kw)))
    monkeypatch.setattr(sys, "argv", ["ilrdpo", "demo", *args])
    try:
        cli.main()
    except SystemExit as stop:
        return stop.code, calls
    return 0, calls


def test_demo_seeds_option_runs_the_study(monkeypatch, tmp_path):
    code, calls = _demo_cli(monkeypatch, ["--seeds", "0,1,2", "--out", str(tmp_path), "loss.alpha=0.5"])
    assert code == 0 and calls == [("study", [0, 1, 2], {"quick": False, "model": None,
                                                         "overrides": ["loss.alpha=0.5"]})]
    code, calls = _demo_cli(monkeypatch, ["--seed", "3", "--out", str(tmp_path)])
    assert code == 0 and [c[:2] for c in calls] == [("demo", 3)]


def test_demo_bad_seeds_is_a_usage_error(monkeypatch, tmp_path, capsys):
    code, calls = _demo_cli(monkeypatch, ["--seeds", "0,x", "--out", str(tmp_path)])
    assert code == 2 and not calls
    assert "comma-separated integers" in capsys.readouterr().err


@pytest.mark.smoke  # reads the bundled prompts
def test_demo_tune_is_the_ilrdpo_arm_searched_over_alpha(tmp_path):
    from ilrdpo.demo import tune_config

    config = tune_config(tmp_path / "t")
    arm = demo_configs(tmp_path / "d", arms={"ilrdpo": ARMS["ilrdpo"]})["ilrdpo"]
    assert list(config.tune.space) == ["loss.alpha"] and config.iterations.count == 1
    assert len(config.tune.objectives) == 2 and config.output_dir == str(tmp_path / "t")
    assert (config.loss, config.scoring, config.generation, config.train) == (arm.loss, arm.scoring, arm.generation,
                                                                             arm.train)
    assert arm.iterations.alpha_control.budget == 1.0 and config.iterations.alpha_control.budget is None  # trials keep alpha


@pytest.mark.slow
def test_demo_tune_quick_runs_a_study(tmp_path):
    """`ilrdpo demo --tune --quick --trials 2`: real trials on the bundled models, a Pareto set."""
    done = subprocess.run([sys.executable, "-m", "ilrdpo", "demo", "--tune", "--quick", "--trials", "2",
                           "--out", str(tmp_path)], env={**os.environ, "ILRDPO_QUIET": "1"},
                          capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "study.db").is_file() and list((tmp_path / "pareto").glob("trial_*.yaml"))
    trials = [json.loads(p.read_text()) for p in tmp_path.glob("trial_*/trial.json")]
    assert len(trials) == 2 and all(0.002 <= t["params"]["loss.alpha"] <= 0.05 for t in trials)
    assert (tmp_path / "plots" / "pareto.png").is_file()


@pytest.mark.smoke  # reads the bundled prompts
def test_arms_carry_the_readmes_names_and_the_quick_demo_says_what_it_cannot_show(tmp_path):
    """Folders stay idpo/ and ilrdpo/; tables, study lines and report.md say vanilla and iLR-DPO;
    the quick demo's report says its size cannot show the effect."""
    from ilrdpo.demo import demo_configs, demo_notes
    from ilrdpo.demo.study import arm_name, study_table

    configs = demo_configs(tmp_path, quick=True)
    assert [arm_name(a) for a in configs] == ["vanilla", "iLR-DPO"]
    quick = "\n".join(demo_notes(configs, quick=True))
    assert "`idpo/` is vanilla, `ilrdpo/` is iLR-DPO" in quick
    assert "cannot show the effect" in quick and "cannot show" not in "\n".join(demo_notes(configs, quick=False))
    rows = [{"arm": arm, "seed": 0, "iteration": 1, "eval_length": 30.0} for arm in ("idpo", "ilrdpo")]
    rows += [{"arm": "idpo", "seed": 0, "iteration": 0, "eval_length": 25.0}]
    table = "\n".join(study_table(rows, ["idpo", "ilrdpo"]))
    assert "| vanilla | 1 |" in table and "| iLR-DPO | 1 |" in table

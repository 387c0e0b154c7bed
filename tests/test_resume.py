"""Resume checks and redo (ilrdpo.resume): which finished work a change touches, the refusal's
words, `--redo ITER:STAGE`, and the no-pairs message's measured causes and fix."""

from __future__ import annotations

import pytest

from ilrdpo.config import build_config
from ilrdpo.errors import UserInputError
from ilrdpo.pairing import pairing_census
from ilrdpo.records import CandidateSet
from ilrdpo.resume import check_resume, drop_from, first_reader, no_pairs_message, parse_redo
from ilrdpo.rundir import next_number
from ilrdpo.runstate import RunState

pytestmark = pytest.mark.unit

# The dead end: iteration 0 evaluated, iteration 1 sampled and scored, pairing failed.
STOPPED_AT_PAIRING = {0: ["eval"], 1: ["generate", "pair", "score"]}


@pytest.mark.parametrize("text,expected", [("1:generate", (1, "generate")), ("2:Train", (2, "train")),
                                           ("3", (3, "generate")), ("0", (0, "eval")), ("0:eval", (0, "eval"))])
def test_parse_redo(text, expected):
    assert parse_redo(text) == expected


@pytest.mark.parametrize("text,message", [("one:generate", "not ITER:STAGE"), ("1:sample", "unknown stage 'sample'"),
                                          ("0:generate", "iteration 0 has only the stage 'eval'")])
def test_parse_redo_refuses_with_one_line(text, message):
    with pytest.raises(UserInputError, match=message):
        parse_redo(text)


@pytest.mark.parametrize("override", ["generation.temperature=1.2", "generation.num_samples=8", "generation.top_p=0.9"])
def test_a_sampling_change_names_the_generate_stage_and_the_redo(override):
    """The greedy initial evaluation reads no sampling key: the refusal names iteration 1's
    'generate' (it named iteration 0's 'eval') and the redo that recomputes from there."""
    old, new = build_config({}), build_config({}, [override])
    with pytest.raises(UserInputError) as error:
        check_resume(old, new, STOPPED_AT_PAIRING, force=False)
    assert "iteration 1 already ran 'generate'" in str(error.value)
    assert "--redo 1:generate" in str(error.value)


def test_max_new_tokens_reaches_the_initial_evaluation_and_sampling_keys_only_with_eval_samples():
    finished = STOPPED_AT_PAIRING
    assert first_reader("generation.max_new_tokens", finished, build_config({})) == (0, "eval")
    assert first_reader("generation.temperature", finished, build_config({})) == (1, "generate")
    sampled_eval = build_config({}, ["experimental.eval_samples=2"])
    assert first_reader("generation.temperature", finished, sampled_eval) == (0, "eval")
    with pytest.raises(UserInputError, match=r"--redo 0:eval"):
        check_resume(build_config({}), build_config({}, ["generation.max_new_tokens=32"]), finished, force=False)


def test_the_redo_point_is_the_earliest_any_change_reaches():
    old, new = build_config({}), build_config({}, ["loss.beta=0.2", "pairing.strategy=all"])
    finished = {0: ["eval"], 1: ["generate", "score", "pair", "train", "eval"]}
    with pytest.raises(UserInputError, match=r"pairing.strategy.*--redo 1:pair"):
        check_resume(old, new, finished, force=False)
    # with the changed stages dropped (what --redo 1:pair keeps), nothing is refused
    check_resume(old, new, {0: ["eval"], 1: ["generate", "score"]}, force=False)


def candidates(responses, truncated, rewards, pid="p") -> CandidateSet:
    return CandidateSet(prompt="q", id=pid, responses=responses, n_tokens=[len(r) for r in responses],
                        truncated=truncated, rewards=rewards, quality=rewards)


def test_no_pairs_names_truncation_first_with_counts_and_a_redo_that_raises_the_limit():
    config = build_config({"generation": {"max_new_tokens": 16, "num_samples": 4}, "output_dir": "runs/x"})
    sets = [candidates(["a a", "b b", "c", ""], [True, True, True, False], [1.0, 0.5, 0.2, 0.0], pid="p0"),
            candidates(["x", "y", "z", "w"], [True, True, True, False], [1.0, 0.5, 0.2, 0.1], pid="p1"),
            candidates(["k", "k", "k", "k"], [True, True, True, True], [0.3, 0.3, 0.3, 0.3], pid="p2")]
    census = pairing_census(sets, config.pairing)
    assert census == {"prompts": 3, "answers": 12, "cut": 10, "empty": 1, "too_few": 3, "identical": 0, "tied": 0,
                      "paired": 0}
    message = no_pairs_message(census, config, 1, STOPPED_AT_PAIRING)
    assert message.startswith("no preference pairs in iteration 1: 10 of 12 answers were cut at "
                              "generation.max_new_tokens=16")
    # the initial evaluation decodes with generation.max_new_tokens too: redo from there
    assert message.endswith("ilrdpo run runs/x/config.yaml --redo 0:eval generation.max_new_tokens=32")


def test_no_pairs_from_identical_answers_suggests_a_higher_temperature():
    config = build_config({"generation": {"temperature": 0.2}, "output_dir": "o"})
    sets = [candidates(["same", "same"], [False, False], [0.5, 0.5], pid=f"p{i}") for i in range(3)]
    census = pairing_census(sets, config.pairing)
    assert (census["identical"], census["tied"]) == (3, 0)
    message = no_pairs_message(census, config, 1, STOPPED_AT_PAIRING)
    assert message.startswith("no preference pairs in iteration 1: 3 of 3 prompts got identical answers")
    assert message.endswith("--redo 1:generate generation.temperature=1.0")


def test_replaced_folder_numbers_are_never_reused(tmp_path):
    assert next_number(tmp_path / "missing", "[0-9]*") == 1
    for name in ("001", "003"):
        (tmp_path / name).mkdir()
    assert next_number(tmp_path, "[0-9]*") == 4


def test_drop_from_unmarks_the_point_and_everything_after_with_their_alpha(tmp_path):
    state = RunState(tmp_path / "state.json")
    state.finished = {0: ["eval"], 1: ["generate", "score", "pair", "train", "eval"], 2: ["generate", "score"]}
    state.started = {k: list(v) for k, v in state.finished.items()}
    state.alpha, state.alpha_setting = {1: 0.1}, {1: 0.1}
    dropped = drop_from(state, (1, "train"))
    assert dropped == {1: ["eval", "train"], 2: ["generate", "score"]}
    assert state.finished == {0: ["eval"], 1: ["generate", "score", "pair"], 2: []}
    assert state.alpha == {} and state.alpha_setting == {}


def test_a_bad_redo_on_the_command_line_is_one_line_and_status_2(monkeypatch, capsys):
    from ilrdpo import cli

    monkeypatch.setattr("sys.argv", ["ilrdpo", "run", "--redo", "1:sample"])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: option '--redo': unknown stage 'sample'; stages are generate, score, pair, train, eval"]

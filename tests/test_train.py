"""Smoke tier: one round of preference training (ilrdpo.train) on the tiny Llama.

Twelve hand-made pairs: the chosen answer is short and on topic, the rejected one is a longer
answer about something else. With a high learning rate the tiny model must learn to prefer the
chosen answers within a few epochs.

First-step arithmetic used below: before the first update the policy IS the reference, so every
implicit reward beta * (log pi - log pi_ref) is 0 and the margin is the length term alone:
loss_1 = mean over pairs of softplus(-alpha * (c(y_w) - c(y_l))), which is log 2 when alpha = 0.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch

from helpers import DESIGN_METRICS, first_lines
from ilrdpo.config import DataSettings, LoraSettings, LossSettings, TrainSettings, build_config
from ilrdpo.data import collate_pairs, tokenize_pairs
from ilrdpo.errors import TrainingDiverged, UserInputError
from ilrdpo.logprobs import sequence_logps
from ilrdpo.models import add_lora
from ilrdpo.offline import run_offline
from ilrdpo.records import PreferencePair
from ilrdpo.train import DivergenceGuard, pair_reference_logps, train_round

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

QA = [
    ("What colour is the sky on a clear day?", "Blue."),
    ("What is 2 + 2?", "Four."),
    ("Name the largest planet.", "Jupiter."),
    ("What do bees make?", "Honey."),
    ("Which animal says moo?", "A cow."),
    ("What is frozen water called?", "Ice."),
    ("How many days are in a week?", "Seven."),
    ("What is the capital of France?", "Paris."),
    ("Which fruit is yellow and curved?", "A banana."),
    ("What do you use to write on a blackboard?", "Chalk."),
    ("What gas do plants take in?", "Carbon dioxide."),
    ("Opposite of hot?", "Cold."),
]
OFF_TOPIC = [
    "Let me talk about football instead: it went to penalties.",
    "The weather has been cold and rainy all week.",
    "Here is a soup recipe with onions and lots of garlic.",
]
PAIRS = [PreferencePair(prompt=q, chosen=a, rejected=OFF_TOPIC[i % 3]) for i, (q, a) in enumerate(QA)]


LR = 3e-3


def train_settings(**overrides) -> TrainSettings:
    """Constant high rate, no warmup: the first step already moves the weights."""
    values = {"learning_rate": LR, "epochs": 4, "batch_size": 4, "warmup_ratio": 0.0,
              "lr_scheduler": "constant", "max_length": 128}
    return TrainSettings(**{**values, **overrides})


def run(model, tokenizer, tmp_path, loss: LossSettings | None = None, pairs=PAIRS, **train_overrides):
    result = train_round(model, tokenizer, pairs, loss=loss or LossSettings(beta=0.1),
                         train=train_settings(**train_overrides), data=DataSettings(), output_dir=tmp_path)
    return result, read_metrics(tmp_path / "metrics.jsonl")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def pair_logps(model, tokenizer, pairs=PAIRS) -> torch.Tensor:
    """(P, 2) [chosen, rejected] summed answer log-probs, all pairs in one batch."""
    examples = tokenize_pairs(tokenizer, pairs, max_length=128)
    batch = collate_pairs(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        logps, _ = sequence_logps(model.eval(), batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    return torch.stack([logps[:len(pairs)], logps[len(pairs):]], dim=1)


def answer_tokens(tokenizer, pairs=PAIRS) -> torch.Tensor:
    """(P, 2) answer token counts as the length margin sees them: the answer's own tokens, the
    EOS the training rows end with not counted (data.count_tokens, the one definition)."""
    ids = [[tokenizer(text, add_special_tokens=False)["input_ids"] for text in (p.chosen, p.rejected)] for p in pairs]
    return torch.tensor([[len(c), len(r)] for c, r in ids], dtype=torch.float32)


# --- one full run, inspected by several tests --------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tokenizer, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    before_params = {name: p.detach().clone() for name, p in model.named_parameters()}
    before_logps = pair_logps(model, tokenizer)
    out = tmp_path_factory.mktemp("trained")
    result, metrics = run(model, tokenizer, out)
    return {"model": model, "result": result, "metrics": metrics, "before_params": before_params,
            "before_logps": before_logps, "after_logps": pair_logps(model, tokenizer)}


def test_loss_falls(trained):
    losses = [m["loss"] for m in trained["metrics"]]
    assert len(losses) == 12  # 4 epochs x ceil(12 / 4) micro-batches, grad_accum 1
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference before step 1


def test_margin_rises_on_training_pairs(trained):
    before = trained["before_logps"][:, 0] - trained["before_logps"][:, 1]
    after = trained["after_logps"][:, 0] - trained["after_logps"][:, 1]
    gain = after - before  # (P,)
    assert gain.mean() > 1.0
    assert (gain > 0).sum() >= 10


def test_every_trainable_parameter_changes(trained):
    for name, param in trained["model"].named_parameters():
        assert param.requires_grad
        assert not torch.equal(param.detach(), trained["before_params"][name]), name


def test_metrics_have_the_design_names_on_every_line(trained):
    metrics = trained["metrics"]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    for line in metrics:
        assert DESIGN_METRICS <= line.keys()
        assert all(math.isfinite(line[key]) for key in DESIGN_METRICS)
        assert line["learning_rate"] == pytest.approx(LR)
        assert 0.0 <= line["rewards/accuracies"] <= 1.0
        assert line["rewards/margins"] == pytest.approx(line["rewards/chosen"] - line["rewards/rejected"], abs=1e-5)
    assert trained["result"].steps == 12 and trained["result"].final == metrics[-1]
    assert metrics[-1]["rewards/accuracies"] == 1.0


def test_reference_is_the_initial_model(trained):
    """The reference log-probs used are the initial model's, so step 1 has zero rewards."""
    used = torch.tensor(trained["result"].ref_logps)  # (P, 2)
    torch.testing.assert_close(used, trained["before_logps"], rtol=1e-5, atol=1e-4)
    first = trained["metrics"][0]
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-4)
    assert first["rewards/rejected"] == pytest.approx(0.0, abs=1e-4)


# --- properties that need their own run ---------------------------------------------------------


def test_repeatable_with_the_same_seed(tiny_model_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    runs = []
    for name in ("a", "b"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        _, metrics = run(model, tokenizer, tmp_path / name, epochs=1, batch_size=6)
        runs.append(([{k: v for k, v in m.items() if k != "elapsed_s"} for m in metrics],
                     [p.detach().clone() for p in model.parameters()]))
    assert len(runs[0][0]) == 2
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_precomputed_reference_is_used(tiny_model, tokenizer, tmp_path):
    """ref = initial log-probs + [1, 0]: step-1 rewards/chosen = 0.1 * (0 - 1) = -0.1, rejected 0."""
    ref = pair_logps(tiny_model, tokenizer) + torch.tensor([1.0, 0.0])
    result = train_round(tiny_model, tokenizer, PAIRS, loss=LossSettings(beta=0.1),
                         train=train_settings(epochs=1, batch_size=12), data=DataSettings(),
                         output_dir=tmp_path, ref_logps=ref)
    (first,) = read_metrics(tmp_path / "metrics.jsonl")
    assert first["rewards/chosen"] == pytest.approx(-0.1, abs=1e-4)
    assert first["rewards/rejected"] == pytest.approx(0.0, abs=1e-4)
    torch.testing.assert_close(torch.tensor(result.ref_logps), ref)


def test_first_step_length_margin(tiny_model, tokenizer, tmp_path):
    """alpha = 0.02, tokens: m_i = 0.02 * (n_w - n_l) (rewards are 0 at step 1), so
    loss_1 = mean softplus(-m_i) and length/margin_term = mean m_i. The chosen answers are
    the shorter ones, so every m_i < 0 and the loss is above log 2."""
    n = answer_tokens(tokenizer)  # (P, 2)
    term = 0.02 * (n[:, 0] - n[:, 1])
    _, (first,) = run(tiny_model, tokenizer, tmp_path, LossSettings(beta=0.1, alpha=0.02), epochs=1, batch_size=12)
    assert first["length/margin_term"] == pytest.approx(term.mean().item(), abs=1e-5)
    assert first["loss"] == pytest.approx(torch.nn.functional.softplus(-term).mean().item(), abs=1e-4)
    assert first["loss"] > math.log(2)
    assert first["length/chosen"] == pytest.approx(n[:, 0].mean().item())


def test_first_step_target_lengths_per_pair(tiny_model, tokenizer, tmp_path):
    """Per-pair targets L*_i = n_w + 2 (every chosen answer 2 tokens short of its target):
    c_w = 2, c_l = |n_l - L*_i|;  m_i = 0.05 * (2 - c_l);  loss_1 = mean softplus(-m_i)."""
    n = answer_tokens(tokenizer)
    pairs = [PreferencePair(p.prompt, p.chosen, p.rejected, target_length=int(n[i, 0]) + 2)
             for i, p in enumerate(PAIRS)]
    target = n[:, 0] + 2
    term = 0.05 * ((n[:, 0] - target).abs() - (n[:, 1] - target).abs())
    _, (first,) = run(tiny_model, tokenizer, tmp_path, LossSettings(beta=0.1, alpha=0.05), pairs=pairs,
                      epochs=1, batch_size=12)
    assert first["length/margin_term"] == pytest.approx(term.mean().item(), abs=1e-5)
    assert first["loss"] == pytest.approx(torch.nn.functional.softplus(-term).mean().item(), abs=1e-4)


def test_gradient_accumulation_matches_one_big_batch(tiny_model_dir, tokenizer, tmp_path):
    """12 pairs as 3 micro-batches of 4 accumulated = one batch of 12: same loss, same gradient norm."""
    from transformers import AutoModelForCausalLM

    lines = []
    for name, batch_size, grad_accum in (("big", 12, 1), ("accum", 4, 3)):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        _, metrics = run(model, tokenizer, tmp_path / name, LossSettings(beta=0.1, alpha=0.02), epochs=1,
                         batch_size=batch_size, grad_accum=grad_accum)
        assert len(metrics) == 1
        lines.append(metrics[0])
    big, accum = lines
    assert accum["grad_norm"] == pytest.approx(big["grad_norm"], rel=1e-4)
    assert accum["loss"] == pytest.approx(big["loss"], abs=1e-5)
    assert accum["length/margin_term"] == pytest.approx(big["length/margin_term"], abs=1e-5)


@pytest.mark.parametrize("loss_type", ["simpo", "ld_dpo", "ipo"])
def test_other_loss_types_run_a_step(tiny_model, tokenizer, tmp_path, loss_type):
    """One step each, with the first-step loss worked out (rewards 0 except for SimPO):
    ld_dpo: log 2;  ipo: (0 - 1 / (2 * 0.1))^2 = 25;
    simpo: m_i = 0.1 * (logp_w / n_w - logp_l / n_l) - 0.5, no reference pass, where n counts
    the scored tokens: the answer's and its EOS."""
    logps, n = pair_logps(tiny_model, tokenizer), answer_tokens(tokenizer) + 1
    simpo_margin = 0.1 * (logps[:, 0] / n[:, 0] - logps[:, 1] / n[:, 1]) - 0.5
    expected = {"ld_dpo": math.log(2), "ipo": 25.0,
                "simpo": torch.nn.functional.softplus(-simpo_margin).mean().item()}[loss_type]
    result, (first,) = run(tiny_model, tokenizer, tmp_path, LossSettings(type=loss_type, beta=0.1), epochs=1,
                           batch_size=12)
    assert first["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert (result.ref_logps is None) == (loss_type == "simpo")
    assert DESIGN_METRICS <= first.keys()


# --- LoRA --------------------------------------------------------------------------------------


def base_weights(model) -> dict[str, torch.Tensor]:
    """Non-adapter weights under their plain transformers names (PEFT inserts '.base_layer')."""
    return {name.replace(".base_layer", ""): p.detach().clone()
            for name, p in model.named_parameters() if "lora_" not in name}


def test_lora_trains_only_the_adapter(tiny_model, tokenizer, tmp_path):
    base_logps = pair_logps(tiny_model, tokenizer)
    base_before = base_weights(tiny_model)
    torch.manual_seed(0)
    model = add_lora(tiny_model, LoraSettings(r=4, alpha=8, dropout=0.0))
    adapter = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert adapter and all("lora_" in name for name in adapter)
    adapter_before = {name: p.detach().clone() for name, p in adapter.items()}

    result, metrics = run(model, tokenizer, tmp_path / "round1", epochs=1)
    assert len(metrics) == 3 and metrics[-1]["loss"] < metrics[0]["loss"]
    for name, p in adapter.items():
        assert not torch.equal(p.detach(), adapter_before[name]), name
    base_after = base_weights(model.get_base_model())
    assert base_after.keys() == base_before.keys()
    assert all(torch.equal(base_after[k], base_before[k]) for k in base_before)
    # A fresh adapter (B = 0) is the base model, so the first reference equals the base log-probs.
    torch.testing.assert_close(torch.tensor(result.ref_logps), base_logps, rtol=1e-5, atol=1e-4)

    # After training the adapter matters; with it disabled we get the base model back.
    settings = {"loss": LossSettings(beta=0.1), "train": train_settings(), "data": DataSettings()}
    disabled = pair_reference_logps(model, tokenizer, PAIRS, **settings, disable_adapter=True)
    enabled = pair_reference_logps(model, tokenizer, PAIRS, **settings)
    torch.testing.assert_close(disabled, base_logps, rtol=1e-5, atol=1e-4)
    assert (enabled - base_logps).abs().max() > 0.1

    # A second round: by default its reference is the model as the round starts (adapter on) ...
    result2, _ = run(model, tokenizer, tmp_path / "round2", epochs=1, batch_size=12)
    torch.testing.assert_close(torch.tensor(result2.ref_logps), enabled, rtol=1e-5, atol=1e-4)
    # ... and with ref_adapter_disabled it is the base model; step-1 rewards/chosen is then
    # 0.1 * mean(policy - base) over the chosen answers.
    model_after_round2 = pair_logps(model, tokenizer)
    result3 = train_round(model, tokenizer, PAIRS, loss=LossSettings(beta=0.1),
                          train=train_settings(epochs=1, batch_size=12), data=DataSettings(),
                          output_dir=tmp_path / "round3", ref_adapter_disabled=True)
    torch.testing.assert_close(torch.tensor(result3.ref_logps), base_logps, rtol=1e-5, atol=1e-4)
    (first3,) = read_metrics(tmp_path / "round3" / "metrics.jsonl")
    expected_chosen = 0.1 * (model_after_round2[:, 0] - base_logps[:, 0]).mean().item()
    assert first3["rewards/chosen"] == pytest.approx(expected_chosen, abs=1e-3)


# --- divergence --------------------------------------------------------------------------------


def test_nan_weight_raises_training_diverged(tiny_model, tokenizer, tmp_path):
    with torch.no_grad():
        tiny_model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"diverged at step 1: non-finite loss"):
        run(tiny_model, tokenizer, tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_huge_learning_rate_is_stopped_after_its_first_step(tiny_model, tokenizer, tmp_path):
    """lr 0.1 (the largest the config takes) with Adam moves each weight of the tiny model (std
    0.02) by ~0.1 in one step: the weight norm grows several-fold, which the drift rule stops
    at step 1, before anything is saved; the message names the step and the figure."""
    with pytest.raises(TrainingDiverged, match=r"diverged at step 1: weight norm [\d.e+]+ moved more than 1 x") as info:
        run(tiny_model, tokenizer, tmp_path, learning_rate=0.1, epochs=2)
    assert "last good model is kept" in str(info.value)
    assert not (tmp_path / "metrics.jsonl").exists()  # a failed round leaves no metrics of its own


def guard(start_norm: float = 1.0) -> DivergenceGuard:
    g = DivergenceGuard([torch.nn.Parameter(torch.full((4,), start_norm / 2))])  # norm = start_norm
    return g


@pytest.mark.parametrize("losses,grads,stops_at,why", [
    # noisy but sane: DPO losses between 0 and 3, gradient norms between 1 and 30
    ([0.7, 0.2, 3.0, 0.1, 0.5, 2.5, 0.05, 1.0], [5, 1, 30, 2, 8, 20, 1, 9], None, None),
    # loss 25 > 20 x max(median 0.69, 1) after 5 steps of history
    ([0.69] * 6 + [25.0], [1.0] * 7, 7, "loss 25"),
    # the same loss in the first 5 steps only sets the history
    ([25.0, 0.69, 0.69], [1.0] * 3, None, None),
    # saturated pairs: gradient norms near 0.017, then one pair at 17.7 (the default demo's iLR-DPO
    # arm): under 100 x max(median, clipping norm 1), not an explosion
    ([0.05] * 6 + [2.0], [0.017] * 6 + [17.7], None, None),
    # gradient norm 500 > 100 x median 2
    ([0.6] * 6 + [0.6], [2.0] * 6 + [500.0], 7, "gradient norm 500"),
    ([0.6, float("inf")], [1.0, 1.0], 2, "non-finite loss"),
    ([0.6, 0.6], [1.0, float("nan")], 2, "non-finite gradient norm"),
])
def test_divergence_rule_by_hand(losses, grads, stops_at, why):
    g = guard()
    for step, (loss, grad) in enumerate(zip(losses, grads), start=1):
        if step == stops_at:
            with pytest.raises(TrainingDiverged, match=f"step {step}: .*{why}"):
                g.check_loss(step, loss)
                g.check(step, loss, grad)
            return
        g.check_loss(step, loss)
        g.check(step, loss, grad)
    assert stops_at is None


def test_divergence_rule_measures_the_loss_against_the_pairs_start():
    """IPO with a length term (alpha 0.025): pairs fit to a
    loss near 0, then a step of shorter-chosen pairs whose targets the length term raises has loss
    47.9 and a loss at the reference of 60 (one pair 30 tokens shorter: ((0.5 + 0.025 x 30) / 0.1)^2
    = 156; averaged with an easier one): no divergence. The same loss against a loss at the
    reference of 1 stops; a diverged step far above its own start (2,000 > 20 x 60) still stops."""
    g = guard()
    for step in range(1, 7):
        g.check(step, 0.3, 1.0, loss_at_reference=4.0)
    g.check(7, 47.9, 5.0, loss_at_reference=60.0)
    with pytest.raises(TrainingDiverged, match="step 8: loss 47.9 > 20 x 1 .recent median"):
        g.check(8, 47.9, 5.0, loss_at_reference=1.0)
    with pytest.raises(TrainingDiverged, match="step 8: loss 2000 > 20 x 60 .its loss at the reference"):
        guard_ = guard()
        for step in range(1, 8):
            guard_.check(step, 0.3, 1.0, loss_at_reference=4.0)
        guard_.check(8, 2000.0, 5.0, loss_at_reference=60.0)


def test_loss_at_reference_is_the_loss_at_a_zero_log_ratio_margin():
    """Against preference_loss itself with policy log-probs equal to the reference's."""
    from ilrdpo.config import LossSettings
    from ilrdpo.loss import preference_loss
    from ilrdpo.train import loss_at_reference

    logps, lengths_w, lengths_l = torch.tensor([-5.0, -9.0]), torch.tensor([80.0, 10.0]), torch.tensor([10.0, 60.0])
    for settings in (LossSettings(type="ipo", alpha=0.0125), LossSettings(type="sigmoid", alpha=0.05)):
        out = preference_loss(logps, logps, logps, logps, lengths_w, lengths_l, loss_type=settings.type,
                              beta=settings.beta, alpha=settings.alpha)
        assert torch.allclose(loss_at_reference(out.length_term, settings), out.losses)


def test_divergence_rule_weight_drift():
    """Weights whose norm doubles (moved by 1 x their starting norm) stop the round; 50% does not."""
    g = guard()
    (p,) = g.params
    with torch.no_grad():
        p.mul_(1.5)
    g.check(1, 0.6, 1.0)
    with torch.no_grad():
        p.mul_(1.5)  # 2.25 x the start
    with pytest.raises(TrainingDiverged, match="step 2: weight norm 2.25 moved more than 1 x its start 1"):
        g.check(2, 0.6, 1.0)


def test_divergence_does_not_write_the_model(tiny_model, tokenizer, tmp_path):
    """run_offline (what `ilrdpo train` runs) stops before saving: no model/ in a fresh run
    directory, and a previous run's model/ is left exactly as it was."""
    with torch.no_grad():
        tiny_model.model.layers[1].self_attn.q_proj.weight[3, 5] = float("nan")
    broken = tmp_path / "broken_model"
    tiny_model.save_pretrained(broken)
    tokenizer.save_pretrained(broken)
    for run_name, previous in (("fresh", None), ("rerun", "weights of an earlier good run")):
        out = tmp_path / run_name
        if previous:
            (out / "model").mkdir(parents=True)
            (out / "model" / "README.md").write_text(previous)
        config = build_config({"model": {"name_or_path": str(broken), "dtype": "float32"},
                               "data": {"pairs": str(first_lines(EXAMPLES / "pairs.jsonl", 2, tmp_path))},
                               "train": {"batch_size": 8, "max_length": 128}, "output_dir": str(out)})
        with pytest.raises(TrainingDiverged, match="step 1"):
            run_offline(config, overwrite=previous is not None)
        assert (out / "config.yaml").exists()
        if previous:
            assert sorted(p.name for p in (out / "model").iterdir()) == ["README.md"]
            assert (out / "model" / "README.md").read_text() == previous
        else:
            assert not (out / "model").exists()
        assert not (out / "model.staging").exists()


def test_mixed_target_lengths_are_rejected_whatever_the_batch_size(tiny_model, tokenizer, tmp_path):
    """Two short pairs with a target length, two long ones without. With batch_size 2 the
    reference pass (batches of 4) sees both kinds and raises; with batch_size 1 the reference
    batches of 2 are grouped by length (short with short, long with long), training batches
    hold one pair each, and the run silently mixes |y| and | |y| - L* | in one loss."""
    pairs = [
        PreferencePair("Hi?", "Yes.", "No.", target_length=5),
        PreferencePair("Yo?", "Ok.", "Nah.", target_length=5),
        PreferencePair("Tell me a long story about a dragon and a knight?",
                       "Once upon a time there was a dragon who lived in a cave.",
                       "A knight rode out one morning to find the dragon of the hills."),
        PreferencePair("Tell me another long story about a cat and a dog?",
                       "Once upon a time a cat and a dog became good friends.",
                       "The dog barked at the cat every single morning until noon."),
    ]
    loss = LossSettings(beta=0.1, alpha=0.01)
    with pytest.raises(UserInputError, match="target_length is set on 2 of 4 pairs"):
        run(tiny_model, tokenizer, tmp_path / "bs2", loss, pairs=pairs, epochs=1, batch_size=2)
    with pytest.raises(UserInputError, match="target_length is set on 2 of 4 pairs"):
        run(tiny_model, tokenizer, tmp_path / "bs1", loss, pairs=pairs, epochs=1, batch_size=1)


def test_metrics_reach_tensorboard_through_accelerate(tiny_model, tokenizer, tmp_path):
    """train.report_to=[tensorboard]: the per-step metrics land in an event file under logs/."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, metrics = run(tiny_model, tokenizer, tmp_path, epochs=1, batch_size=6, report_to=["tensorboard"])
    event_files = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert event_files
    scalars = set()
    for path in event_files:
        acc = EventAccumulator(str(path))
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
    assert {"train/loss", "train/rewards/margins", "train/grad_norm"} <= scalars
    assert len(metrics) == 2


# --- prefix sharing and token-budget micro-batches -----------------------------------------------


def first_step_gradients(model_dir, tokenizer, loss: LossSettings, lora: bool = False, prefix_sharing: str = "auto",
                         **train_overrides):
    """(metrics of step 1, {name: gradient}) of a one-step round whose learning rate is ~0, so the
    gradients of that step can be read off a hook on the optimizer. prefix_sharing on / off: the
    layout forced for this round (batching.PREFIX_SHARING)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    from transformers import AutoModelForCausalLM

    from ilrdpo import batching

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if lora:
        torch.manual_seed(0)
        model = add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
        with torch.no_grad():  # a nonzero B, so the adapter's A matrices get gradients too
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    grads = {}
    names = {id(p): name for name, p in model.named_parameters()}

    def keep(optimizer, *_):
        for group in optimizer.param_groups:
            for p in group["params"]:
                grads[names[id(p)]] = p.grad.detach().clone()

    settings = train_settings(epochs=1, learning_rate=1e-12, max_grad_norm=1e9, **train_overrides)
    handle = register_optimizer_step_pre_hook(keep)
    measured = dict(batching.PREFIX_SHARING)
    if prefix_sharing != "auto":
        batching.PREFIX_SHARING["cpu"] = prefix_sharing == "on"
    try:
        with tempfile.TemporaryDirectory() as out:
            train_round(model, tokenizer, PAIRS, loss=loss, train=settings, data=DataSettings(), output_dir=out)
            first = read_metrics(Path(out) / "metrics.jsonl")[0]
    finally:
        handle.remove()
        batching.PREFIX_SHARING.update(measured)
    return first, grads


def assert_same_step(a, b):
    (metrics_a, grads_a), (metrics_b, grads_b) = a, b
    for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert metrics_a[key] == pytest.approx(metrics_b[key], rel=1e-4, abs=1e-5), key
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("loss", [LossSettings(beta=0.1, alpha=0.02), LossSettings(type="ld_dpo", ld_alpha=0.4),
                                  LossSettings(type="simpo")], ids=["lr_dpo", "ld_dpo", "simpo"])
def test_prefix_sharing_gives_the_plain_step(tiny_model_dir, tokenizer, loss):
    """Same pairs, one step of 12: prompt once per pair (packed rows) or twice (two rows) give the
    same loss, reference log-probs, rewards and per-parameter gradients."""
    assert_same_step(first_step_gradients(tiny_model_dir, tokenizer, loss, batch_size=12, prefix_sharing="on"),
                     first_step_gradients(tiny_model_dir, tokenizer, loss, batch_size=12, prefix_sharing="off"))


def test_prefix_sharing_gives_the_plain_step_with_lora(tiny_model_dir, tokenizer):
    loss = LossSettings(beta=0.1)
    on = first_step_gradients(tiny_model_dir, tokenizer, loss, lora=True, batch_size=12, prefix_sharing="on")
    assert all("lora_" in name for name in on[1])
    assert_same_step(on, first_step_gradients(tiny_model_dir, tokenizer, loss, lora=True, batch_size=12,
                                              prefix_sharing="off"))


# Positions per micro-batch that give several micro-batches of 1 to 3 pairs per step: a pair here
# takes 51-58 positions packed, 94-108 as two rows.
BUDGET = {"on": 160, "off": 420}


@pytest.mark.parametrize("prefix_sharing", ["on", "off"])
def test_token_budget_gives_the_fixed_batch_step(tiny_model_dir, tokenizer, prefix_sharing):
    """A step of 4 x 3 = 12 pairs, re-split into micro-batches of at most BUDGET positions (of
    unequal sizes), has the gradient of 3 accumulated micro-batches of 4: each
    micro-batch's mean loss is weighted by its share of the step's pairs, so the step's loss is
    the mean over its 12 pairs either way."""
    loss = LossSettings(beta=0.1, alpha=0.02)
    fixed = first_step_gradients(tiny_model_dir, tokenizer, loss, batch_size=4, grad_accum=3,
                                 prefix_sharing=prefix_sharing)
    budget = first_step_gradients(tiny_model_dir, tokenizer, loss, batch_size=4, grad_accum=3,
                                  prefix_sharing=prefix_sharing, max_tokens_per_batch=BUDGET[prefix_sharing])
    assert_same_step(fixed, budget)


def test_token_budget_micro_batches_stay_under_the_budget(tokenizer):
    from ilrdpo.data import padded_tokens, split_by_token_budget

    examples = tokenize_pairs(tokenizer, PAIRS, max_length=128)
    for shared, budget in ((True, BUDGET["on"]), (False, BUDGET["off"])):
        batches = split_by_token_budget(examples, list(range(12)), shared, budget)
        assert sorted(i for b in batches for i in b) == list(range(12))
        assert 4 <= len(batches) <= 6 and len({len(b) for b in batches}) > 1
        assert all(padded_tokens([examples[i] for i in b], shared) <= budget for b in batches)
    assert split_by_token_budget(examples, [0, 1], True, 10) == [[1], [0]]  # too large: alone

"""Preference losses (ilrdpo.loss): hand-worked values, the length margin, and TRL cross-checks.

Shared worked example (unless a test says otherwise), beta = 0.1:

    policy_chosen = -10, ref_chosen = -12   ->  chosen reward   =  0.1 * ( 2) =  0.2
    policy_rejected = -15, ref_rejected = -14  ->  rejected reward = 0.1 * (-1) = -0.1
    margin m = 0.2 - (-0.1) = 0.3
    softplus(-0.3) = log(1 + e^-0.3) = log(1.7408182) = 0.5543552
    softplus( 0.3) = 0.3 + softplus(-0.3)            = 0.8543552
"""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

from ilrdpo.logprobs import ld_weights, sequence_logps
from ilrdpo.loss import LOSSES, length_cost, length_margin_term, length_reversed, preference_loss, target_margin

BETA = 0.1
SP_NEG = math.log1p(math.exp(-0.3))  # softplus(-0.3) = -log sigmoid(0.3) = 0.5543552
SP_POS = 0.3 + SP_NEG  # softplus(0.3) = -log sigmoid(-0.3) = 0.8543552


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def worked(loss_type: str = "sigmoid", chosen_len: float = 10.0, rejected_len: float = 40.0, **kwargs):
    """The shared example as a batch of one."""
    return preference_loss(t(-10.0), t(-15.0), t(-12.0), t(-14.0), t(chosen_len), t(rejected_len),
                           loss_type=loss_type, beta=BETA, **kwargs)


# --- hand-worked values of each loss type ------------------------------------------------------


def test_sigmoid_is_dpo():
    """alpha = 0: loss = -log sigmoid(0.3) = softplus(-0.3) = 0.5543552 (DPO, eq. 7)."""
    losses, chosen, rejected, _ = worked("sigmoid")
    assert losses.item() == pytest.approx(0.5543552, abs=1e-6)
    assert chosen.item() == pytest.approx(0.2, abs=1e-6)
    assert rejected.item() == pytest.approx(-0.1, abs=1e-6)


def test_sigmoid_with_length_margin():
    """alpha = 0.01, |y_w| = 10, |y_l| = 40:

    length term = 0.01 * (10 - 40) = -0.3;  m = 0.3 - 0.3 = 0;  loss = -log sigmoid(0) = log 2.
    The shorter chosen answer loses margin, so the loss is higher than DPO's 0.5544.
    """
    losses, _, _, _ = worked("sigmoid", alpha=0.01)
    assert losses.item() == pytest.approx(math.log(2), abs=1e-6)
    # Swapped lengths: term = 0.01 * (40 - 10) = +0.3, m = 0.6, loss = softplus(-0.6) = 0.4374350.
    swapped, _, _, _ = worked("sigmoid", chosen_len=40.0, rejected_len=10.0, alpha=0.01)
    assert swapped.item() == pytest.approx(math.log1p(math.exp(-0.6)), abs=1e-6)


def test_cdpo_label_smoothing():
    """cDPO, eps = 0.1: -(1 - eps) logsig(m) - eps logsig(-m)
    = 0.9 * 0.5543552 + 0.1 * 0.8543552 = 0.4989197 + 0.0854355 = 0.5843552
    (= softplus(-m) + eps * m = 0.5543552 + 0.03)."""
    losses, _, _, _ = worked("sigmoid", label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.5843552, abs=1e-6)


def test_robust():
    """Robust DPO, eps = 0.1: [-(1 - eps) logsig(m) + eps logsig(-m)] / (1 - 2 eps)
    = (0.9 * 0.5543552 - 0.1 * 0.8543552) / 0.8 = (0.4989197 - 0.0854355) / 0.8 = 0.5168552."""
    losses, _, _, _ = worked("robust", label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.5168552, abs=1e-6)
    # eps = 0 is plain DPO.
    plain, _, _, _ = worked("robust")
    assert plain.item() == pytest.approx(SP_NEG, abs=1e-6)


def test_ipo():
    """IPO: h = m / beta = 0.3 / 0.1 = 3 (the log-ratio difference 2 - (-1));
    loss = (h - 1 / (2 beta))^2 = (3 - 5)^2 = 4.
    With alpha = 0.01, lengths 10 vs 40: m = 0.3 - 0.3 = 0, loss = (0 - 5)^2 = 25."""
    losses, _, _, _ = worked("ipo")
    assert losses.item() == pytest.approx(4.0, abs=1e-5)
    with_length, _, _, _ = worked("ipo", alpha=0.01)
    assert with_length.item() == pytest.approx(25.0, abs=1e-4)


@pytest.mark.parametrize(("loss_type", "eps"), [("ipo", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.25)])
def test_target_margin_is_where_the_loss_is_smallest(loss_type, eps):
    """Found independently: the loss's minimiser over m on a float64 grid."""
    m = torch.linspace(-10, 10, 200_001, dtype=torch.float64)
    losses = LOSSES[loss_type].fn(m, BETA, eps)
    assert m[losses.argmin()].item() == pytest.approx(target_margin(loss_type, eps), abs=2e-4)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "simpo", "ld_dpo"])
def test_losses_without_a_target_margin_keep_falling(loss_type):
    m = torch.linspace(-10, 10, 2001, dtype=torch.float64)
    losses = LOSSES[loss_type].fn(m, BETA, 0.0)
    assert target_margin(loss_type) is None and (losses.diff() <= 0).all()


def test_length_reversed_pairs_are_those_past_the_target():
    """IPO at alpha 0.0125: length terms 0.5 (40 tokens longer) and more are reversed; DPO never."""
    term = length_margin_term(t(50.0, 41.0, 40.0, 10.0, 20.0), t(0.0, 0.0, 0.0, 0.0, 60.0), 0.0125)
    assert length_reversed(term, "ipo").tolist() == [True, True, False, False, False]
    assert not length_reversed(term, "sigmoid").any()
    # IPO's optimum really is reversed there: beta * delta = 1/2 - term < 0 minimises the loss
    delta = torch.linspace(-20, 20, 40_001, dtype=torch.float64)
    best = delta[LOSSES["ipo"].fn(BETA * delta + term[0].double(), BETA, 0.0).argmin()]
    assert best.item() == pytest.approx((0.5 - term[0].item()) / BETA, abs=1e-2) and best < 0


def test_hinge():
    """SLiC hinge: relu(1 - m) = relu(1 - 0.3) = 0.7; a margin past 1 costs nothing:
    alpha = 0.03, lengths 40 vs 10: m = 0.3 + 0.03 * 30 = 1.2, loss = relu(-0.2) = 0."""
    losses, _, _, _ = worked("hinge")
    assert losses.item() == pytest.approx(0.7, abs=1e-6)
    past, _, _, _ = worked("hinge", chosen_len=40.0, rejected_len=10.0, alpha=0.03)
    assert past.item() == 0.0


def test_simpo_is_reference_free_and_length_normalised():
    """SimPO, beta = 2, gamma = 0.5, no reference:

    chosen:   logp = -6 over 3 tokens  -> reward = 2 * (-6 / 3)  = -4
    rejected: logp = -20 over 4 tokens -> reward = 2 * (-20 / 4) = -10
    m = -4 - (-10) - 0.5 = 5.5;  loss = softplus(-5.5) = log(1 + e^-5.5) = 0.0040784.
    """
    losses, chosen, rejected, _ = preference_loss(
        t(-6.0), t(-20.0), None, None, t(3.0), t(4.0), loss_type="simpo", beta=2.0, simpo_gamma=0.5)
    assert losses.item() == pytest.approx(0.0040784, abs=1e-6)
    assert chosen.item() == pytest.approx(-4.0) and rejected.item() == pytest.approx(-10.0)


def test_simpo_averages_over_tokens_when_lengths_are_chars():
    """Length unit chars: lengths 12 and 30 characters feed the length term only; the average
    uses n_tokens 3 and 4. Same numbers as above plus alpha = 0.1:
    m = 5.5 + 0.1 * (12 - 30) = 5.5 - 1.8 = 3.7;  loss = softplus(-3.7) = 0.0244196."""
    losses, chosen, _, _ = preference_loss(
        t(-6.0), t(-20.0), None, None, t(12.0), t(30.0), loss_type="simpo", beta=2.0, simpo_gamma=0.5,
        alpha=0.1, chosen_scored_tokens=t(3.0), rejected_scored_tokens=t(4.0))
    assert losses.item() == pytest.approx(math.log1p(math.exp(-3.7)), abs=1e-6)
    assert chosen.item() == pytest.approx(-4.0)


def test_unknown_loss_type_names_the_choices():
    with pytest.raises(ValueError, match="unknown loss_type 'dpo'.*sigmoid"):
        worked("dpo")


def test_every_loss_type_is_finite_and_differentiable():
    """Each registered loss maps a batch of margins to finite per-example losses with gradients."""
    torch.manual_seed(1)
    for name in LOSSES:
        policy_chosen = (-torch.rand(4) * 10).requires_grad_()
        losses, _, _, _ = preference_loss(policy_chosen, -torch.rand(4) * 10, -torch.rand(4) * 10,
                                       -torch.rand(4) * 10, t(3, 5, 7, 9), t(4, 4, 4, 4),
                                       loss_type=name, alpha=0.01, label_smoothing=0.1)
        assert losses.shape == (4,) and torch.isfinite(losses).all(), name
        losses.sum().backward()
        assert torch.isfinite(policy_chosen.grad).all() and policy_chosen.grad.abs().sum() > 0, name


# --- the length margin -------------------------------------------------------------------------


def test_length_margin_pushes_harder_toward_a_shorter_chosen_answer():
    """d loss / d policy_chosen = -beta * sigmoid(-m).

    chosen shorter (10 vs 40), alpha = 0.01: m = 0,   grad = -0.1 * 0.5       = -0.05
    chosen longer  (40 vs 10):               m = 0.6, grad = -0.1 * 0.3543437 = -0.0354344
    alpha = 0 gives the same gradient either way: -0.1 * sigmoid(-0.3) = -0.0425557.
    """
    def grad(chosen_len: float, rejected_len: float, alpha: float) -> float:
        policy_chosen = t(-10.0).requires_grad_()
        losses, _, _, _ = preference_loss(policy_chosen, t(-15.0), t(-12.0), t(-14.0), t(chosen_len),
                                       t(rejected_len), beta=BETA, alpha=alpha)
        losses.sum().backward()
        return policy_chosen.grad.item()

    shorter, longer = grad(10, 40, 0.01), grad(40, 10, 0.01)
    assert shorter == pytest.approx(-0.05, abs=1e-7)
    assert longer == pytest.approx(-0.1 / (1 + math.exp(0.6)), abs=1e-7)
    assert abs(shorter) > abs(longer)
    assert grad(10, 40, 0.0) == pytest.approx(grad(40, 10, 0.0)) == pytest.approx(-0.0425557, abs=1e-7)


def test_length_cost_with_a_target_length():
    """c(y) = | |y| - L* |: with L* = 20, lengths [15, 40, 20] cost [5, 20, 0]."""
    torch.testing.assert_close(length_cost(t(15, 40, 20), 20.0), t(5, 20, 0))
    torch.testing.assert_close(length_cost(t(15, 40, 20)), t(15, 40, 20))


def test_target_length_margin():
    """L* = 20, |y_w| = 15, |y_l| = 40, alpha = 0.02:
    c_w = 5, c_l = 20; term = 0.02 * (5 - 20) = -0.3;  m = 0.3 - 0.3 = 0;  loss = log 2.
    Without the target, term = 0.02 * (15 - 40) = -0.5, m = -0.2, loss = softplus(0.2) = 0.7981389."""
    losses, _, _, _ = worked("sigmoid", chosen_len=15.0, rejected_len=40.0, alpha=0.02, target_length=20.0)
    assert losses.item() == pytest.approx(math.log(2), abs=1e-6)
    no_target, _, _, _ = worked("sigmoid", chosen_len=15.0, rejected_len=40.0, alpha=0.02)
    assert no_target.item() == pytest.approx(math.log1p(math.exp(0.2)), abs=1e-6)


def test_per_example_target_lengths():
    """Targets [20, 50], alpha = 0.02, chosen lengths [15, 45], rejected [40, 40]:

    pair 1: c_w = |15 - 20| = 5, c_l = |40 - 20| = 20, term = 0.02 * (5 - 20)  = -0.3
    pair 2: c_w = |45 - 50| = 5, c_l = |40 - 50| = 10, term = 0.02 * (5 - 10)  = -0.1
    With log-ratio margin 0.3 on both: m = [0, 0.2], loss = [log 2, softplus(-0.2) = 0.5981389].
    """
    targets = t(20, 50)
    term = length_margin_term(t(15, 45), t(40, 40), 0.02, targets)
    torch.testing.assert_close(term, t(-0.3, -0.1))
    losses, _, _, _ = preference_loss(t(-10, -10), t(-15, -15), t(-12, -12), t(-14, -14), t(15, 45), t(40, 40),
                                   beta=BETA, alpha=0.02, target_length=targets)
    torch.testing.assert_close(losses, t(math.log(2), math.log1p(math.exp(-0.2))))


def test_rewards_are_detached_and_beta_times_log_ratio():
    """Rewards are beta * (policy - ref), per example, with no graph attached."""
    policy_chosen = t(-10.0, -3.0).requires_grad_()
    policy_rejected = t(-15.0, -4.0).requires_grad_()
    losses, chosen, rejected, _ = preference_loss(policy_chosen, policy_rejected, t(-12.0, -3.5), t(-14.0, -1.0),
                                               t(5, 6), t(7, 8), beta=0.5, alpha=0.1)
    assert losses.requires_grad
    assert not chosen.requires_grad and not rejected.requires_grad
    torch.testing.assert_close(chosen, t(0.5 * 2.0, 0.5 * 0.5))
    torch.testing.assert_close(rejected, t(0.5 * -1.0, 0.5 * -3.0))


# --- cross-checks against TRL ------------------------------------------------------------------
# TRL 1.16 computes its losses inline in DPOTrainer._compute_loss (no pure function), from a
# model patched with trl's fused LM head. We run that method on a real tiny Llama, on a trainer
# made with object.__new__ and given only the attributes the method reads, with reference
# log-probs passed precomputed. Our loss then gets exactly the log-probs TRL used.


@pytest.fixture(scope="module")
def trl_setup():
    pytest.importorskip("trl")
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=48, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))

    # 3 pairs, right padded, rows [chosen x3; rejected x3]: (prompt length, answer length).
    shapes = [(4, 3), (2, 6), (5, 1)] + [(4, 5), (2, 2), (5, 4)]
    width = max(p + a for p, a in shapes)
    input_ids = torch.randint(3, 48, (6, width))
    attention_mask = torch.zeros(6, width, dtype=torch.long)
    completion_mask = torch.zeros(6, width, dtype=torch.long)
    for row, (n_prompt, n_answer) in enumerate(shapes):
        attention_mask[row, :n_prompt + n_answer] = 1
        completion_mask[row, n_prompt:n_prompt + n_answer] = 1
    input_ids[attention_mask == 0] = 0
    return {"model": model, "accelerator": Accelerator(cpu=True), "input_ids": input_ids,
            "attention_mask": attention_mask, "completion_mask": completion_mask}


def trl_dpo_loss(setup, loss_type: str, beta: float, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                 label_smoothing: float = 0.0, ld_alpha: float | None = None) -> torch.Tensor:
    from trl.trainer.dpo_trainer import DPOTrainer

    trainer = object.__new__(DPOTrainer)
    attributes = {
        "model": setup["model"], "accelerator": setup["accelerator"], "aux_loss_enabled": False,
        "ld_alpha": ld_alpha, "precompute_ref_logps": True, "f_divergence_type": "reverse_kl",
        "loss_types": [loss_type], "loss_weights": [1.0], "beta": beta,
        "label_smoothing": label_smoothing, "use_weighting": False,
        "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
        "_total_train_tokens": 0, "_tp_size": 1,
    }
    for name, value in attributes.items():
        object.__setattr__(trainer, name, value)
    inputs = {k: setup[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    inputs.update(ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
    with torch.no_grad():
        return trainer._compute_loss(setup["model"], inputs, return_outputs=False)


def trl_policy_logps(setup) -> torch.Tensor:
    """Summed answer log-probs (6,) from the same fused-head call TRL's loss makes."""
    labels = setup["input_ids"].masked_fill(setup["completion_mask"] == 0, -100)
    with torch.no_grad():
        out = setup["model"](input_ids=setup["input_ids"], attention_mask=setup["attention_mask"],
                             labels=labels, fused_lm_head=True, use_cache=False)
    return out.log_probs.sum(1)


REF = (torch.tensor([-9.0, -20.0, -3.5]), torch.tensor([-16.0, -7.0, -13.0]))


def ours(setup, loss_type: str, beta: float, policy: torch.Tensor, ref=REF, **kwargs) -> torch.Tensor:
    n_answer = setup["completion_mask"].sum(1).float()
    losses, _, _, _ = preference_loss(policy[:3], policy[3:], ref[0], ref[1], n_answer[:3], n_answer[3:],
                                   loss_type=loss_type, beta=beta, alpha=0.0, **kwargs)
    return losses.mean()


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_alpha_zero_matches_trl_sigmoid(trl_setup, beta):
    policy = trl_policy_logps(trl_setup)
    expected = trl_dpo_loss(trl_setup, "sigmoid", beta, *REF)
    torch.testing.assert_close(ours(trl_setup, "sigmoid", beta, policy), expected, rtol=1e-6, atol=1e-6)


def test_our_sequence_logps_match_trl_fused_head(trl_setup):
    """The same tiny model, our sequence_logps against TRL's per-token log-probs summed."""
    with torch.no_grad():
        logps, n_tokens = sequence_logps(trl_setup["model"], trl_setup["input_ids"],
                                         trl_setup["attention_mask"], trl_setup["completion_mask"])
    torch.testing.assert_close(logps, trl_policy_logps(trl_setup), rtol=1e-5, atol=1e-5)
    assert n_tokens.tolist() == [3, 6, 1, 5, 2, 4]


def test_hinge_matches_trl(trl_setup):
    policy = trl_policy_logps(trl_setup)
    torch.testing.assert_close(ours(trl_setup, "hinge", 0.3, policy), trl_dpo_loss(trl_setup, "hinge", 0.3, *REF),
                               rtol=1e-6, atol=1e-6)


def test_robust_matches_trl(trl_setup):
    policy = trl_policy_logps(trl_setup)
    expected = trl_dpo_loss(trl_setup, "robust", 0.1, *REF, label_smoothing=0.2)
    torch.testing.assert_close(ours(trl_setup, "robust", 0.1, policy, label_smoothing=0.2), expected,
                               rtol=1e-6, atol=1e-6)


def test_ipo_matches_trl_on_token_averaged_logps(trl_setup):
    """TRL's IPO divides each log-ratio by the answer's token count (a choice confirmed with the
    IPO authors, per TRL's comment); ours is the paper's eq. 17 on the log-probs it is given. So
    ours on per-token averaged log-probs must equal TRL's, and on sums it must not."""
    policy = trl_policy_logps(trl_setup)
    n_answer = trl_setup["completion_mask"].sum(1).float()  # (6,)
    averaged_ref = (REF[0] / n_answer[:3], REF[1] / n_answer[3:])
    expected = trl_dpo_loss(trl_setup, "ipo", 0.1, *REF)
    torch.testing.assert_close(ours(trl_setup, "ipo", 0.1, policy / n_answer, ref=averaged_ref), expected,
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours(trl_setup, "ipo", 0.1, policy), expected)


def test_ld_dpo_matches_trl(trl_setup):
    """LD-DPO = our ld_weights on the response mask + sequence_logps + the sigmoid loss."""
    mask = ld_weights(trl_setup["completion_mask"], 3, 0.5)
    with torch.no_grad():
        policy, _ = sequence_logps(trl_setup["model"], trl_setup["input_ids"], trl_setup["attention_mask"], mask)
    expected = trl_dpo_loss(trl_setup, "sigmoid", 0.1, *REF, ld_alpha=0.5)
    torch.testing.assert_close(ours(trl_setup, "ld_dpo", 0.1, policy), expected, rtol=1e-5, atol=1e-5)


def test_trl_cross_check_can_fail(trl_setup):
    """Guard: a different beta gives a different TRL loss, so the matches above are not vacuous."""
    policy = trl_policy_logps(trl_setup)
    assert not torch.allclose(ours(trl_setup, "sigmoid", 0.1, policy), trl_dpo_loss(trl_setup, "sigmoid", 0.5, *REF))


@pytest.mark.unit
def test_pair_accuracy_counts_round_off_margins_as_not_correct():
    """Step 1: the policy is the reference up to round-off. A reward margin of 9.5e-7 (beta * delta)
    is noise, not a preference: not correct. TRL's rule (chosen > rejected) holds beyond 1e-6."""
    from ilrdpo.loss import pair_accuracy
    from ilrdpo.train import _micro_step

    chosen, rejected = torch.tensor([9.5e-7, 2e-6, -1e-3]), torch.zeros(3)
    assert pair_accuracy(chosen, rejected).tolist() == [0.0, 1.0, 0.0]
    # the logged rewards/accuracies: policy log-probs 9.5e-6 over the reference's (beta 0.1 -> 9.5e-7)
    ref = torch.tensor([[-10.0, -12.0]], dtype=torch.float64)
    policy = torch.tensor([-10.0 + 9.5e-6, -12.0], dtype=torch.float64, requires_grad=True)
    batch = {"lengths": torch.tensor([5.0, 5.0]), "scored_tokens": torch.tensor([5, 5])}
    from ilrdpo.config import LossSettings

    stats = _micro_step(policy, batch, ref, [0], LossSettings(), 1.0, lambda losses, weight, finite: None)
    assert stats["rewards/accuracies"] == 0.0

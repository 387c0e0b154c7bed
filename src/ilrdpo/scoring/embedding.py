"""Quality as cosine similarity between an answer and the prompt's reference answer
(embedding_similarity) or the prompt (prompt_similarity: the document a summary should cover, the
last user turn a reply should answer)."""

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
        self.name = f"{settings.type} scorer '{settings.model or DEFAULT_MODEL}'"
        self.batch_size = settings.batch_size
        self.to_prompt = settings.type == "prompt_similarity"

    def score(self, prompts: list[Prompt], responses: list[str]) -> list[float]:
        if self.to_prompt:
            targets = [p.prompt if isinstance(p.prompt, str) else last_user_turn(p.prompt) for p in prompts]
        else:
            missing = [p.id for p in prompts if not p.reference]
            if missing:
                raise UserInputError(f"prompt '{missing[0]}' has no 'reference'; embedding_similarity needs one "
                                     "(or scoring.type prompt_similarity, which compares with the prompt)")
            targets = [p.reference for p in prompts]
        texts = targets + list(responses)
        emb = self.model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                                normalize_embeddings=True, show_progress_bar=False)  # (2n, D)
        refs, answers = emb[:len(prompts)], emb[len(prompts):]
        return (refs * answers).sum(-1).float().cpu().tolist()


def last_user_turn(messages: list[dict[str, str]]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])

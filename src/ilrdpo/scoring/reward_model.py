"""A sequence-classification reward model: prompt and answer in its own chat template.

A text longer than the model's limit is cut from the left: the prompt goes first and the answer
being judged is never cut before the prompt is gone. Every cut is counted (`truncated`) and
reported once per scoring call.
"""

from __future__ import annotations

import torch

from ilrdpo.config import ScoringSettings
from ilrdpo.data import as_messages
from ilrdpo.errors import UserInputError
from ilrdpo.progress import console
from ilrdpo.records import Prompt


def conversation_text(tokenizer, prompt: Prompt, response: str) -> str:
    """Prompt and answer as the reward model reads them: its chat template, else prompt, newline, answer."""
    if getattr(tokenizer, "chat_template", None):
        messages = as_messages(prompt.prompt) + [{"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    text = prompt.prompt if isinstance(prompt.prompt, str) else "\n".join(m["content"] for m in prompt.prompt)
    return f"{text}\n{response}"


class RewardModelScorer:
    def __init__(self, settings: ScoringSettings, device: torch.device) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(settings.model)
            self.model = AutoModelForSequenceClassification.from_pretrained(settings.model, dtype=dtype)
        except OSError as error:
            raise UserInputError(f"scoring.model '{settings.model}': cannot load ({str(error).splitlines()[0]})") \
                from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"  # keep the end: the answer under judgement
        self.model.to(device).eval()
        self.device = device
        self.name = f"reward model '{settings.model}'"
        self.max_length = min(getattr(self.tokenizer, "model_max_length", 4096) or 4096, 4096)
        self.truncated = 0  # texts cut to max_length so far

    def _text(self, prompt: Prompt, response: str) -> str:
        return conversation_text(self.tokenizer, prompt, response)

    @torch.no_grad()
    def score(self, prompts: list[Prompt], responses: list[str]) -> list[float]:
        texts = [self._text(p, r) for p, r in zip(prompts, responses)]
        # The chat template already holds the special tokens.
        special = not getattr(self.tokenizer, "chat_template", None)
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=special)["input_ids"]]
        cut = sum(n > self.max_length for n in lengths)
        if cut:
            self.truncated += cut
            console.print(f"[yellow]{self.name}: {cut} of {len(texts)} texts longer than {self.max_length} tokens "
                          f"were cut from the left (prompt first; {self.truncated} so far)[/yellow]")
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                               max_length=self.max_length, add_special_tokens=special)
        logits = self.model(**batch.to(self.device)).logits  # (B, num_labels)
        return logits[:, 0].float().cpu().tolist()

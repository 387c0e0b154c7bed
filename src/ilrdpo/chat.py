"""`ilrdpo chat`: talk to a trained model in the terminal, with best-of-N and a target length.

Lines typed (or piped) are user turns; the history is kept. Commands: /reset (forget the
history), /save FILE (the conversation as JSON messages), /quit. A single sample is streamed as
it is generated; with --best-of N the N candidates are scored, the best (by the scorer's score
and the target length, as `ilrdpo generate --best-of`) is kept, and --verbose shows them all.
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from ilrdpo.best_of import Rerank, choose
from ilrdpo.config import DataSettings, GenerationSettings, ModelSettings, ScoringSettings
from ilrdpo.errors import UserInputError
from ilrdpo.generation.sampling import _generation_config, generate_answers
from ilrdpo.records import Prompt

Messages = list[dict[str, str]]


@dataclass
class ChatSession:
    model: object
    tokenizer: object
    generation: GenerationSettings
    data: DataSettings
    best_of: int = 1
    scorer: object | None = None
    rerank: Rerank = field(default_factory=Rerank)
    verbose: bool = False
    history: Messages = field(default_factory=list)
    turn: int = 0

    def reply(self, text: str, out: TextIO) -> str:
        """One user turn: the answer is added to the history and returned (and written to out)."""
        self.history.append({"role": "user", "content": text})
        self.turn += 1
        if self.best_of > 1:
            answer = self._best_of(out)
        else:
            answer = self._streamed(out)
        self.history.append({"role": "assistant", "content": answer})
        return answer

    def _streamed(self, out: TextIO) -> str:
        from transformers import TextIteratorStreamer

        from ilrdpo.data import encode_prompt

        ids = encode_prompt(self.tokenizer, self.history, self.data.use_chat_template, self.data.system_prompt)
        device = next(self.model.parameters()).device
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        torch.manual_seed(self.turn)
        config = _generation_config(self.model, self.tokenizer, self.generation, greedy=False)
        config.cache_implementation = None
        worker = threading.Thread(target=self.model.generate, kwargs={
            "input_ids": torch.tensor([ids], device=device), "generation_config": config, "streamer": streamer})
        worker.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            out.write(piece)
            out.flush()
        worker.join()
        out.write("\n")
        return "".join(pieces).strip()

    def _best_of(self, out: TextIO) -> str:
        from ilrdpo.scoring import score_in_batches

        prompt = Prompt(prompt=list(self.history), id=f"turn{self.turn}")
        samples = generate_answers(self.model, self.tokenizer, [prompt], self.generation, self.data,
                                   num_samples=self.best_of, seed=self.turn, description="candidates")[prompt.id]
        texts = [s.text for s in samples]
        scores = score_in_batches(self.scorer, [prompt] * len(texts), texts, len(texts)) if self.scorer \
            else [0.0] * len(texts)
        candidates = [{"text": t, "score": sc, "n_tokens": s.n_tokens} for t, sc, s in zip(texts, scores, samples)]
        kept = choose(candidates, self.rerank.target_length, self.rerank)
        if self.verbose:
            for i, c in enumerate(candidates):
                mark = "*" if i == kept else " "
                out.write(f"  {mark} [{c['score']:.4f}, {c['n_tokens']} tokens] {c['text']}\n")
        out.write(candidates[kept]["text"] + "\n")
        out.flush()
        return candidates[kept]["text"]


def run_chat(model: str, *, best_of: int = 1, scorer: ScoringSettings | None = None, rerank: Rerank | None = None,
             generation: GenerationSettings | None = None, system_prompt: str | None = None, verbose: bool = False,
             stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> Messages:
    """The chat loop until /quit or the end of the input; returns the last history."""
    from ilrdpo.models import load_saved_policy
    from ilrdpo.scoring import build_scorer

    if best_of > 1 and scorer is None:
        raise UserInputError("option '--best-of': needs --scorer to choose among the candidates")
    policy, tokenizer, _ = load_saved_policy(model, ModelSettings(name_or_path=model), trainable=False)
    policy.eval()
    session = ChatSession(policy, tokenizer, generation or GenerationSettings(),
                          DataSettings(system_prompt=system_prompt), best_of=best_of,
                          scorer=build_scorer(scorer) if scorer else None, rerank=rerank or Rerank(), verbose=verbose)
    interactive = stdin.isatty()
    if interactive:
        stdout.write("ilrdpo chat: /reset, /save FILE, /quit\n")
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            break
        if text == "/reset":
            session.history = []
            stdout.write("(history cleared)\n")
            continue
        if text.startswith("/save"):
            target = text.removeprefix("/save").strip() or "chat.json"
            Path(target).write_text(json.dumps(session.history, indent=1, ensure_ascii=False))
            stdout.write(f"(saved {len(session.history)} messages to {target})\n")
            continue
        if interactive:
            stdout.write("assistant> ")
        session.reply(text, stdout)
    return session.history

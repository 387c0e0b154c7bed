"""`ilrdpo chat`: talk to a trained model in the terminal, with best-of-N and a target length.

Lines typed (or piped) are user turns; the history is kept. Commands: /reset (forget the
history), /save FILE (the conversation as JSON messages, the system message first), /quit; any
other line that starts with / is refused with that list (// sends a line that starts with /). A
single sample is streamed as it is generated; with --best-of N the N candidates are scored, the
best (by the scorer's score and the target length, as `ilrdpo generate --best-of N`) is kept, and
--verbose shows them all. A reply cut at max_new_tokens is marked as such.
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from ilrdpo.config import DataSettings, GenerationSettings, ModelSettings, ScoringSettings
from ilrdpo.errors import UserInputError
from ilrdpo.generation import _decode, _generation_config, generate_answers
from ilrdpo.generation.best_of import Rerank, choose
from ilrdpo.records import Prompt

Messages = list[dict[str, str]]
COMMANDS = "/reset, /save FILE, /quit"


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
    seed: int = 0

    def reply(self, text: str, out: TextIO) -> str:
        """One user turn: the answer is added to the history and returned (and written to out)."""
        self.history.append({"role": "user", "content": text})
        self.turn += 1
        if self.best_of > 1:
            answer, cut = self._best_of(out)
        else:
            answer, cut = self._streamed(out)
        if cut:
            out.write(f"[cut at the {self.generation.max_new_tokens}-token limit; --max-new-tokens raises it]\n")
        self.history.append({"role": "assistant", "content": answer})
        return answer

    def messages(self) -> Messages:
        """The conversation as the model saw it: the system message (if any), then the turns."""
        system = [{"role": "system", "content": self.data.system_prompt}] if self.data.system_prompt else []
        return system + self.history

    def _streamed(self, out: TextIO) -> tuple[str, bool]:
        """(reply, cut at max_new_tokens), written to out as it is decoded."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        from ilrdpo.data import encode_prompt

        ids = encode_prompt(self.tokenizer, self.history, self.data.use_chat_template, self.data.system_prompt)
        device = next(self.model.parameters()).device
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        torch.manual_seed(self.seed + self.turn)
        config = _generation_config(self.model, self.tokenizer, self.generation, greedy=False)
        config.cache_implementation = None
        stop, result = threading.Event(), []
        # Ctrl-C arrives in this thread; the event ends the decoding thread at its next token
        kwargs = {"input_ids": torch.tensor([ids], device=device), "generation_config": config, "streamer": streamer,
                  "stopping_criteria": StoppingCriteriaList([lambda input_ids, scores, **_: stop.is_set()])}
        worker = threading.Thread(target=lambda: result.append(self.model.generate(**kwargs)), daemon=True)
        worker.start()
        pieces = []
        try:
            for piece in streamer:
                pieces.append(piece)
                out.write(piece)
                out.flush()
        finally:
            stop.set()
            worker.join()
        out.write("\n")
        new_ids = result[0][:, len(ids):]  # (1, T_new)
        return "".join(pieces).strip(), _decode(self.tokenizer, new_ids, config.eos_token_id)[0].truncated

    def _best_of(self, out: TextIO) -> tuple[str, bool]:
        from ilrdpo.scoring import score_in_batches

        prompt = Prompt(prompt=list(self.history), id=f"turn{self.turn}")
        samples = generate_answers(self.model, self.tokenizer, [prompt], self.generation, self.data,
                                   num_samples=self.best_of, seed=self.seed + self.turn,
                                   description="candidates")[prompt.id]
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
        return candidates[kept]["text"], samples[kept].truncated


def run_chat(model: str, *, best_of: int = 1, scorer: ScoringSettings | None = None, rerank: Rerank | None = None,
             generation: GenerationSettings | None = None, system_prompt: str | None = None, verbose: bool = False,
             seed: int = 0, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> Messages:
    """The chat loop until /quit or the end of the input; returns the last history."""
    from ilrdpo.models import load_saved_policy
    from ilrdpo.scoring import build_scorer

    if best_of > 1 and scorer is None:
        raise UserInputError("option '--best-of': needs --scorer to choose among the candidates")
    policy, tokenizer, _ = load_saved_policy(model, ModelSettings(name_or_path=model), trainable=False)
    policy.eval()
    session = ChatSession(policy, tokenizer, generation or GenerationSettings(),
                          DataSettings(system_prompt=system_prompt), best_of=best_of, seed=seed,
                          scorer=build_scorer(scorer) if scorer else None, rerank=rerank or Rerank(), verbose=verbose)
    interactive = stdin.isatty()
    if interactive:
        stdout.write(f"ilrdpo chat: {COMMANDS}\n")
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if text == "/quit":
            break
        if text.startswith("/") and not text.startswith("//"):
            stdout.write(command(session, text) + "\n")
            continue
        if text:
            if interactive:
                stdout.write("assistant> ")
            session.reply(text.removeprefix("/"), stdout)
    return session.history


def command(session: ChatSession, text: str) -> str:
    """A /command line (other than /quit): what it did, in parentheses."""
    name, _, argument = text.partition(" ")
    if name == "/reset":
        session.history = []
        return "(history cleared)"
    if name == "/save":
        target = argument.strip() or "chat.json"
        messages = session.messages()
        Path(target).write_text(json.dumps(messages, indent=1, ensure_ascii=False))
        return f"(saved {len(messages)} messages to {target})"
    return f"(unknown command {name}; the commands are {COMMANDS}; a line that starts with // is sent as /...)"

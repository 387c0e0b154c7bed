"""Sampling answers (ilrdpo.generation.sampling): batched, resumable, with in-process backends
(transformers generate; the compacting CPU loop in generation/compact.py)."""

from ilrdpo.generation.sampling import (
    BACKENDS,
    Sample,
    context_length,
    encode_prompts,
    generate_answers,
    generation_model,
)

__all__ = ["BACKENDS", "Sample", "context_length", "encode_prompts", "generate_answers", "generation_model"]

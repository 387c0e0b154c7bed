"""Notebook-style use of ilrdpo's Python API (each block is a notebook cell).

    python examples/python_api.py            # on the bundled SmolLM2-135M-Instruct, a few minutes on a CPU

ILRDPO_EXAMPLE_MODEL points it at another model (the test suite runs it on a tiny random one).
"""

import os

import ilrdpo

MODEL = os.environ.get("ILRDPO_EXAMPLE_MODEL", "bundled:smollm2-135m-instruct")
OUT = os.environ.get("ILRDPO_EXAMPLE_OUT", "runs/python-api")

# %% 1. A config with TRL's DPOConfig names: they are accepted as they are.
trl_style = {
    "model": {"name_or_path": MODEL, "dtype": "float32"},
    "beta": 0.1,
    "learning_rate": 1e-5,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "num_train_epochs": 1,
    "max_length": 256,
    "report_to": "none",
}

# %% 2. Offline LR-DPO on pairs held in Python (a datasets.Dataset works the same way).
pairs = [
    {"prompt": "What is the capital of France?", "chosen": "Paris.",
     "rejected": "The capital of France, a country in Western Europe, is the city of Paris."},
    {"prompt": "How many legs does a spider have?", "chosen": "Eight.",
     "rejected": "Spiders, which are arachnids rather than insects, have eight legs in total."},
    {"prompt": [{"role": "user", "content": "Name a primary colour."}], "chosen": "Red.",
     "rejected": "One of the primary colours, in the traditional model, is red."},
]
trained = ilrdpo.train_pairs(trl_style, pairs=pairs, overwrite=True, output_dir=f"{OUT}/offline", loss={"alpha": 0.01})
print("model:", trained.model_dir, "final loss:", round(trained.result.final["loss"], 4))


# %% 3. The iterative loop with a reward function in TRL's form: fn(prompts, completions, **kwargs).
def brevity_and_overlap(prompts, completions, reference=None, **kwargs):
    """More words shared with the reference answer is better; every extra word costs a little."""
    scores = []
    for completion, ref in zip(completions, reference or [None] * len(completions)):
        words = set(completion.lower().split())
        overlap = len(words & set((ref or "").lower().split()))
        scores.append(overlap - 0.05 * len(completion.split()))
    return scores


prompts = [{"prompt": "What do bees make?", "reference": "Bees make honey."},
           {"prompt": "What colour is the sky on a clear day?", "reference": "The sky is blue."},
           {"prompt": "What is frozen water called?", "reference": "Frozen water is ice."},
           {"prompt": "Which animal says moo?", "reference": "A cow says moo."}]
summaries = ilrdpo.run(
    trl_style, prompts=prompts, eval_prompts=prompts[:2], scorer=brevity_and_overlap,
    output_dir=f"{OUT}/loop", iterations={"count": 1}, loss={"alpha": 0.05},
    generation={"num_samples": 2, "max_new_tokens": 24, "temperature": 1.0}, pairing={"skip_truncated": False},
    eval={"length_anchors": False})
for summary in summaries:
    print(summary["iteration"], "mean length", summary["length"]["tokens_mean"])

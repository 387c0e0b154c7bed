"""The iterative loop (iLR-DPO): generate, score, pair, train, evaluate, once per iteration."""

from __future__ import annotations

import json
from pathlib import Path

from ilrdpo.config import AlphaControlSettings, Config, config_to_yaml, load_config
from ilrdpo.errors import UserInputError
from ilrdpo.evaluation.pairwise import (
    answer_prompts,
    cached_answers,
    evaluate_answers,
    judge_answers,
)
from ilrdpo.generation import generate_answers
from ilrdpo.loss import method_name
from ilrdpo.models import hyperparameters, load_policy, load_saved_policy, save_model
from ilrdpo.pairing import pair_all
from ilrdpo.preflight import check_config
from ilrdpo.progress import console, progress_bar, stage
from ilrdpo.records import (
    CandidateSet,
    append_jsonl,
    atomic_write_text,
    read_jsonl_tolerant,
    read_pairs,
    read_prompts,
    recover_jsonl,
    write_jsonl,
)
from ilrdpo.scoring import build_scorer, score_in_batches, shaped_rewards
from ilrdpo.train import pair_reference_logps, train_round

# --- the iterative loop (iLR-DPO) ---------------------------------------------------------------

# The config sections each stage reads. A finished stage depends on its own sections and every
# earlier stage's; from iteration 2 on, also on everything that shaped the previous model.
STAGE_SECTIONS = {
    "generate": ("model", "data.prompts", "data.max_examples", "data.use_chat_template",
                 "data.system_prompt", "generation", "seed"),
    "score": ("scoring",),
    "pair": ("pairing",),
    "train": ("loss", "train", "iterations.reference", "iterations.alpha_control"),
    "eval": ("eval", "data.eval_prompts"),
}
STAGES = list(STAGE_SECTIONS)


def stage_dependencies(iteration: int, stage_name: str) -> tuple[str, ...]:
    """Config key prefixes whose values a finished (iteration, stage) was computed with."""
    upto = STAGES.index(stage_name) + 1
    if iteration >= 2:
        upto = max(upto, STAGES.index("train") + 1)
    deps = tuple(p for s in STAGES[:upto] for p in STAGE_SECTIONS[s])
    if iteration == 0:  # the initial model's eval answers: model, generation, judge, eval set
        deps = STAGE_SECTIONS["generate"] + STAGE_SECTIONS["score"] + STAGE_SECTIONS["eval"]
    return deps


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume(old: Config, new: Config, finished: dict[int, list[str]], force: bool) -> None:
    """Refuse a config change that touches finished work, unless forced."""
    old_flat, new_flat = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    changed = [k for k in sorted(set(old_flat) | set(new_flat)) if old_flat.get(k) != new_flat.get(k)]
    for iteration, stages in sorted(finished.items()):
        for stage_name in stages:
            deps = stage_dependencies(iteration, stage_name)
            hit = next((k for k in changed if any(k == d or k.startswith(d + ".") for d in deps)), None)
            if hit and not force:
                raise UserInputError(
                    f"{new.output_dir}: config key '{hit}' changed ({old_flat.get(hit)!r} -> "
                    f"{new_flat.get(hit)!r}) but iteration {iteration} already finished '{stage_name}' "
                    "with the old value; use --force to continue anyway, or a new output_dir")


# --- run state ---------------------------------------------------------------------------------


class RunState:
    """state.json in the run directory: finished stages per iteration and alpha per iteration.
    Written atomically after every stage, so a killed run knows exactly what is done."""

    def __init__(self, out: Path) -> None:
        self.path = out / "state.json"
        raw = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.finished: dict[int, list[str]] = {int(k): v for k, v in raw.get("finished", {}).items()}
        self.started: dict[int, list[str]] = {int(k): v for k, v in raw.get("started", {}).items()}
        self.alpha: dict[int, float] = {int(k): v for k, v in raw.get("alpha", {}).items()}

    def done(self, iteration: int, stage_name: str) -> bool:
        return stage_name in self.finished.get(iteration, [])

    def start(self, iteration: int, stage_name: str) -> None:
        if stage_name not in self.started.get(iteration, []):
            self.started.setdefault(iteration, []).append(stage_name)
            self.save()

    def mark(self, iteration: int, stage_name: str) -> None:
        self.finished.setdefault(iteration, []).append(stage_name)
        self.save()

    def touched(self) -> dict[int, list[str]]:
        """Stages finished or with partial output on disk: both were made with the old config."""
        return {t: sorted(set(self.finished.get(t, [])) | set(self.started.get(t, [])))
                for t in set(self.finished) | set(self.started)}

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(
            {"finished": self.finished, "started": self.started, "alpha": self.alpha}, indent=1))


# --- alpha control -----------------------------------------------------------------------------


def next_alpha(alpha: float, mean_length: float, initial_length: float, control: AlphaControlSettings) -> float:
    """Automatic alpha: raise it by a bounded step while the mean eval length is over budget,
    lower it when comfortably under. budget <= 10 is relative to the initial model's mean
    length, larger values are tokens."""
    if control.mode == "constant":
        return alpha
    budget = control.budget * initial_length if control.budget <= 10 else control.budget
    over = mean_length / max(budget, 1e-9) - 1
    if over > 0.02:
        # From alpha = 0 a multiplicative step cannot move, so start at a small floor.
        alpha = max(alpha * (1 + control.step * min(over / 0.1, 1.0)), control.min_alpha, 0.01)
    elif over < -0.10:
        alpha = alpha * (1 - control.step * min(-over / 0.1, 1.0) / 2)
    return min(max(alpha, control.min_alpha), control.max_alpha)


# --- the loop ----------------------------------------------------------------------------------


class IterativeRun:
    """iLR-DPO: for t = 1..T, sample N answers from pi_{t-1}, score, pair best vs worst, train
    pi_t with pi_ref = pi_{t-1}, evaluate. Every stage's output is a file in iter_t/."""

    def __init__(self, config: Config, force: bool = False) -> None:
        check_config(config, "run")
        self.config, self.out = config, Path(config.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.state = RunState(self.out)
        if (self.out / "config.yaml").exists():
            check_resume(load_config(self.out / "config.yaml"), config, self.state.touched(), force)
        atomic_write_text(self.out / "config.yaml", config_to_yaml(config))
        self.prompts = read_prompts(config.data.prompts, config.data.max_examples)
        eval_path = config.eval.prompts or config.data.eval_prompts
        self.eval_prompts = read_prompts(eval_path) if eval_path else []
        self.judge_settings = config.eval.judge or config.scoring
        self.timings: dict[str, float] = {}
        with stage("load scorer", self.timings):
            self.scorer = build_scorer(config.scoring)
            self.judge = self.scorer if config.eval.judge is None else build_scorer(config.eval.judge)
        self.model = self.tokenizer = None
        self.model_iteration = -1

    # models: loaded from disk at the start of each iteration, so a resumed run and an
    # uninterrupted one start every iteration from identical weights.
    def policy(self, iteration: int):
        if self.model_iteration != iteration:
            self.model = None  # free the old weights before loading
            if iteration == 0:
                self.model, self.tokenizer, _ = load_policy(self.config.model)
            else:
                self.model, self.tokenizer, _ = load_saved_policy(self.out / f"iter_{iteration}" / "model",
                                                                  self.config.model)
            self.model_iteration = iteration
        return self.model, self.tokenizer

    def run(self) -> list[dict]:
        summaries = [self._evaluation(0)] if self.eval_prompts else []
        self.state.alpha.setdefault(1, self.config.loss.alpha)
        for t in range(1, self.config.iterations.count + 1):
            summaries.append(self.iteration(t))
        atomic_write_text(self.out / "timings.json", json.dumps(self.timings, indent=1))
        return summaries

    def _stage(self, t: int, name: str, work) -> None:
        if self.state.done(t, name):
            return
        self.state.start(t, name)
        with stage(f"iter {t} {name}", self.timings):
            work()
        self.state.mark(t, name)

    def _evaluation(self, t: int) -> dict:
        path = self.out / f"iter_{t}" / "eval.json"
        self._stage(t, "eval", lambda: self.evaluate(t))
        return json.loads(path.read_text())

    def iteration(self, t: int) -> dict:
        d = self.out / f"iter_{t}"
        self._stage(t, "generate", lambda: self.generate(t, d))
        self._stage(t, "score", lambda: self.score(d))
        self._stage(t, "pair", lambda: self.pair(t, d))
        self._stage(t, "train", lambda: self.train(t, d, self.state.alpha[t]))
        summary = self._evaluation(t)
        if t + 1 not in self.state.alpha:
            self.state.alpha[t + 1] = summary["next_alpha"]
            self.state.save()
        console.print(summary_line(summary))
        return summary

    def generate(self, t: int, d: Path) -> None:
        model, tokenizer = self.policy(t - 1)
        gen = self.config.generation
        samples = generate_answers(
            model, tokenizer, self.prompts, gen, self.config.data, num_samples=gen.num_samples,
            seed=self.config.seed + 1000 * t, progress_file=d / "generation.partial.jsonl",
            source=str(self.config.data.prompts), description=f"iter {t} sampling")
        sets = [CandidateSet(prompt=p.prompt, id=p.id, responses=[s.text for s in samples[p.id]],
                             n_tokens=[s.n_tokens for s in samples[p.id]],
                             truncated=[s.truncated for s in samples[p.id]], reference=p.reference,
                             target_length=p.target_length) for p in self.prompts]
        write_jsonl(d / "candidates.jsonl", sets)
        (d / "generation.partial.jsonl").unlink(missing_ok=True)

    def score(self, d: Path) -> None:
        """Score every answer; finished prompts go to scores.partial.jsonl as they complete."""
        sets = [CandidateSet(**row) for row in read_jsonl_tolerant(d / "candidates.jsonl")]
        progress_file = d / "scores.partial.jsonl"
        scored = {row["id"]: row for row in recover_jsonl(progress_file)}
        by_id = {p.id: p for p in self.prompts}
        settings = self.config.scoring
        per_chunk = max(1, settings.batch_size // max(1, self.config.generation.num_samples))
        todo = [c for c in sets if c.id not in scored]
        with progress_bar("scoring", len(sets)) as bar:
            bar.advance(len(sets) - len(todo))
            for start in range(0, len(todo), per_chunk):
                chunk = todo[start:start + per_chunk]
                prompts = [by_id[c.id] for c in chunk for _ in c.responses]
                quality = score_in_batches(self.scorer, prompts, [r for c in chunk for r in c.responses],
                                           settings.batch_size)
                offset = 0
                for c in chunk:
                    q = quality[offset:offset + len(c.responses)]
                    offset += len(c.responses)
                    scored[c.id] = {"id": c.id, "quality": q, "rewards": shaped_rewards(q, c.n_tokens, settings)}
                    append_jsonl(progress_file, scored[c.id])
                bar.advance(len(chunk))
        rows = [{**c.__dict__, "rewards": scored[c.id]["rewards"], "quality": scored[c.id]["quality"]}
                for c in sets]
        write_jsonl(d / "candidates.jsonl", rows)
        progress_file.unlink(missing_ok=True)

    def pair(self, t: int, d: Path) -> None:
        rows = read_jsonl_tolerant(d / "candidates.jsonl")
        sets = [CandidateSet(**{k: v for k, v in row.items() if k != "quality"}) for row in rows]
        scoring = self.config.scoring
        pairs = pair_all(sets, self.config.pairing, seed=self.config.seed + t,
                         selection_penalty=scoring.selection_length_penalty,
                         length_cap=scoring.length_bias_cap, tie_tolerance=scoring.tie_tolerance)
        if not pairs:
            raise UserInputError(f"{d / 'candidates.jsonl'}: no preference pairs (all answers tied, identical "
                                 "or truncated); raise generation.temperature or num_samples")
        write_jsonl(d / "pairs.jsonl", pairs)

    def train(self, t: int, d: Path, alpha: float) -> None:
        pairs = read_pairs(d / "pairs.jsonl")
        config = self.config
        loss = config.loss.model_copy(update={"alpha": alpha})
        lora = config.model.lora is not None
        ref_logps = None
        if config.iterations.reference == "initial" and t > 1 and not lora:
            # pi_ref = pi_0 under full fine-tuning: score the pairs with pi_0 first, then free it,
            # so two models are never in memory together.
            model, tokenizer = self.policy(0)
            ref_logps = pair_reference_logps(model, tokenizer, pairs, loss, config.train, config.data)
        model, tokenizer = self.policy(t - 1)
        result = train_round(model, tokenizer, pairs, loss=loss, train=config.train, data=config.data,
                             output_dir=d, seed=config.seed + t, ref_logps=ref_logps,
                             ref_adapter_disabled=lora and config.iterations.reference == "initial",
                             hparams=hyperparameters(config))
        atomic_write_text(d / "ref_logps.json", json.dumps(result.ref_logps))
        card = {"title": f"iLR-DPO iteration {t}", "base_model": config.model.name_or_path,
                "method": f"iterative {method_name(loss.type, alpha)}",
                "data": f"{len(pairs)} self-generated pairs", "hyperparameters": {**hyperparameters(config),
                                                                                 "loss.alpha": alpha},
                "metrics": result.final}
        save_model(model, tokenizer, d / "model", card, merge_lora=config.model.merge_lora)
        self.model_iteration = t  # trained in place: the model in memory is now pi_t

    def evaluate(self, t: int) -> dict:
        """Greedy answers of pi_t on the eval prompts, judged, against pi_0 and pi_{t-1}."""
        d = self.out / f"iter_{t}"
        result: dict = {"iteration": t, "alpha": self.state.alpha.get(t, 0.0) if t else None}
        if t > 0:
            result.update(generation_stats(d))
        if self.eval_prompts:
            config = self.config
            gen = config.generation.model_copy(update={"max_new_tokens": config.eval.max_new_tokens
                                                       or config.generation.max_new_tokens})

            def make():
                model, tokenizer = self.policy(t)
                rows = answer_prompts(model, tokenizer, self.eval_prompts, gen, config.data,
                                      greedy=config.eval.greedy, seed=config.seed, description=f"iter {t} eval")
                return judge_answers(self.judge, self.eval_prompts, rows, self.judge_settings)

            rows = cached_answers(d / "eval_answers.jsonl", make)
            baselines = {}
            if t > 0:
                baselines["initial"] = read_jsonl_tolerant(self.out / "iter_0" / "eval_answers.jsonl")
                baselines["previous"] = read_jsonl_tolerant(self.out / f"iter_{t - 1}" / "eval_answers.jsonl")
            result.update(evaluate_answers(rows, self.eval_prompts, baselines, self.judge_settings.tie_tolerance))
        if t > 0:
            initial = json.loads((self.out / "iter_0" / "eval.json").read_text()) if self.eval_prompts else {}
            result["next_alpha"] = next_alpha(
                result["alpha"], result.get("length", {}).get("tokens_mean", 0.0),
                initial.get("length", {}).get("tokens_mean", 0.0), self.config.iterations.alpha_control)
        atomic_write_text(d / "eval.json", json.dumps(result, indent=1))
        return result


def generation_stats(d: Path) -> dict:
    """Per-iteration sampling and pairing figures (gen/*, pairs/*) from the stage files."""
    rows = read_jsonl_tolerant(d / "candidates.jsonl")
    pairs = read_jsonl_tolerant(d / "pairs.jsonl")
    lengths = [n for r in rows for n in r["n_tokens"]]
    rewards = [x for r in rows for x in r.get("rewards", [])]
    return {
        "gen/length_mean": sum(lengths) / max(len(lengths), 1),
        "gen/reward_mean": sum(rewards) / max(len(rewards), 1),
        "gen/truncated_share": sum(t for r in rows for t in r["truncated"]) / max(len(lengths), 1),
        "pairs/count": len(pairs),
        "pairs/reward_margin": sum(p["margin"] for p in pairs) / max(len(pairs), 1),
    }


def summary_line(s: dict) -> str:
    parts = [f"iter {s['iteration']}", f"alpha={s['alpha']:.3g}"]
    if "pairs/count" in s:
        parts.append(f"pairs={s['pairs/count']}")
    if "reward_mean" in s:
        parts += [f"reward={s['reward_mean']:.4f}", f"quality={s['quality_mean']:.4f}",
                  f"length={s['length']['tokens_mean']:.1f}"]
    for name in ("initial", "previous"):
        if f"vs_{name}" in s:
            w = s[f"vs_{name}"]
            parts.append(f"win({name})={w['win_rate']:.1f}% lc={w['lc_win_rate']:.1f}%")
    return "  ".join(parts)


def run_iterations(config: Config, force: bool = False) -> list[dict]:
    """`ilrdpo run`: all iterations, resuming whatever is already finished in output_dir."""
    return IterativeRun(config, force).run()

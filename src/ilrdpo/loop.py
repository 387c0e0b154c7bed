"""The iterative loop (iLR-DPO): generate, score, pair, train, evaluate, once per iteration.

Every stage reads its inputs from files of the run directory and writes its outputs there
(ilrdpo.rundir owns the layout), so a run killed anywhere resumes to the same files.
"""

from __future__ import annotations

import json

import torch

from ilrdpo import distributed, engines, interrupts, ranks
from ilrdpo.alpha import next_alpha, per_unit_alpha
from ilrdpo.config import Config
from ilrdpo.decisions import stage_seed
from ilrdpo.errors import UserInputError
from ilrdpo.eval_stage import evaluate_iteration, print_run_summary, summary_line
from ilrdpo.faults import fault_point
from ilrdpo.files import atomic_write_text, finished_output, read_finished_jsonl, read_json_file, write_jsonl
from ilrdpo.generation import generate_answers
from ilrdpo.generation.server import needs_merged_weights, sample_round
from ilrdpo.hub import hyperparameters, model_card, push_to_hub
from ilrdpo.loss_types import REFERENCE_FREE, method_name
from ilrdpo.models import load_policy, load_saved_policy, resolve_dtype
from ilrdpo.pairing import base_targets, pair_all, pairing_census
from ilrdpo.preflight import check_config
from ilrdpo.progress import console, progress_bar, stage
from ilrdpo.records import CandidateSet, PreferencePair, read_candidates, read_pairs, read_prompts
from ilrdpo.resume import after, apply_redo, check_redo, check_resume, input_hashes, no_pairs_message
from ilrdpo.rundir import SAMPLE_LOGPS_FILE, STAGES, RunDir
from ilrdpo.sampled_reference import read_sample_logps, sampled_reference_logps, write_sample_logps
from ilrdpo.scoring import Scorer, build_scorer, score_in_batches, shaped_rewards
from ilrdpo.tracking import RunTracker
from ilrdpo.train import autocast, pair_reference_logps, train_round

# --- the loop ------------------------------------------------------------------------------------


class IterativeRun:
    """iLR-DPO: for t = 1..T, sample N answers from pi_{t-1}, score, pair best vs worst, train
    pi_t with pi_ref = pi_{t-1}, evaluate. Every stage's output is a file in iter_t/.

    Construction reads and checks every input (nothing is written); open() takes the run
    directory (lock, resume checks, config history, scorer); run() does the iterations.
    """

    def __init__(self, config: Config, force: bool = False, scorer: Scorer | None = None,
                 redo: tuple[int, str] | None = None) -> None:
        check_config(config, "run", scorer_given=scorer is not None)
        self.config, self.force, self.given_scorer, self.redo = config, force, scorer, redo
        self.dir = RunDir(config.output_dir)
        self.prompts = read_prompts(config.data.prompts)
        self.eval_prompts = read_prompts(config.data.eval_prompts) if config.data.eval_prompts else []
        self.judge_settings = config.judge_scorer()
        self.compute_dtype = resolve_dtype(config.model.dtype)
        self.engine = engines.launched()  # the training stage's parallel engine
        self.timings: dict[str, float] = {}
        self.model = self.tokenizer = None
        self.model_iteration = -1

    def open(self) -> None:
        """Resume checks against what the directory was made with, then record this config."""
        self.dir.remove_debris()
        ranks.barrier()  # the main process has cleaned before any process reads
        self.state = self.dir.state()
        self.dir.reconcile(self.state)
        inputs = input_hashes(self.config)
        old = self.dir.recorded_config()
        kept = self.state.touched()
        if self.redo is not None:
            check_redo(self.redo, self.config, self.dir, self.state, bool(self.eval_prompts))
            kept = {t: [s for s in names if not after(t, s, self.redo)] for t, names in kept.items()}
        if old is not None:
            check_resume(old, self.config, kept, self.force, old_inputs=self.state.inputs, new_inputs=inputs)
        if self.redo is not None:
            apply_redo(self.redo, self.dir, self.state)
        self.dir.record_config(self.config)
        resuming = self.state.resume_line()
        if resuming:
            console.print(resuming, markup=False, highlight=False, soft_wrap=True)
        if self.state.inputs != inputs:
            self.state.inputs = inputs
            self.state.save()
        overlap = {str(p.prompt) for p in self.prompts} & {str(p.prompt) for p in self.eval_prompts}
        if overlap:
            console.print(f"[yellow]{len(overlap)} of {len(self.eval_prompts)} eval prompts are also training "
                          "prompts: their win rates are not held-out figures[/yellow]")
        with stage("load scorer", self.timings):
            self.scorer = self.given_scorer or build_scorer(self.config.scoring)
            # an llm judge compares pairs besides the scorer's values
            own = self.config.eval.judge is not None and self.judge_settings.type != "llm"
            self.judge = build_scorer(self.judge_settings) if own else self.scorer

    # models: loaded from disk at the start of each iteration, so a resumed run and an
    # uninterrupted one start every iteration from identical weights.
    def policy(self, iteration: int):
        if self.model_iteration != iteration:
            self.model = None  # free the old weights before loading
            if iteration == 0:
                self.model, self.tokenizer, _ = load_policy(self.config.model)
            else:
                self.model, self.tokenizer, _ = load_saved_policy(self.dir.file(iteration, "model"),
                                                                  self.config.model)
            self.model_iteration = iteration
        return self.model, self.tokenizer

    def run(self, until: tuple[int, str] | None = None) -> list[dict]:
        """Every iteration, or only up to and including stage until = (t, name)."""
        train = self.config.train
        self.tracker = RunTracker(train.report_to, self.dir.root, hyperparameters(self.config))
        try:
            summaries = [self._evaluation(0)] if self.eval_prompts else []
            for t in range(1, self.config.iterations.count + 1):
                if until is not None and until[0] == t:
                    for name in STAGES[:STAGES.index(until[1]) + 1]:
                        self.run_stage(t, name)
                    break
                summaries.append(self.iteration(t))
        finally:
            self.tracker.finish()
        if ranks.is_main():
            atomic_write_text(self.dir.timings_path, json.dumps(self.timings, indent=1))
        return summaries

    def _stage(self, t: int, name: str, work) -> None:
        if self.state.done(t, name):
            return
        with interrupts.where(f"iteration {t}, stage {name}"):
            self.state.start(t, name)
            with stage(f"iter {t} {name}", self.timings):
                work()
            self.state.mark(t, name)
        ranks.barrier()  # what the main process wrote is there before any process reads it

    def _evaluation(self, t: int) -> dict:
        self._stage(t, "eval", lambda: self.evaluate(t))
        summary = self._eval_summary(t)
        self.tracker.log_eval(summary, self.steps_before(t + 1))
        return summary

    def steps_before(self, t: int) -> int:
        """Optimizer steps of iterations 1..t-1: the trackers' global step where iteration t starts."""
        return sum(len(read_finished_jsonl(self.dir.file(k, "metrics.jsonl"), self.dir.redo_hint(k)))
                   for k in range(1, t) if self.state.done(k, "train"))

    def run_stage(self, t: int, name: str) -> None:
        """Stage `name` of iteration t, unless state.json has it finished."""
        work = {"generate": self.generate, "score": self.score, "pair": self.pair, "train": self.train,
                "eval": self.evaluate}[name]
        self._stage(t, name, lambda: work(t))

    def iteration(self, t: int) -> dict:
        for name in STAGES[:-1]:  # generate, score, pair, train; then eval
            self.run_stage(t, name)
        summary = self._evaluation(t)
        console.print(summary_line(summary))
        if ranks.is_main() and (removed := self.dir.prune_models(self.config.iterations.keep_models, t)):
            console.print(f"removed {', '.join(str(p.relative_to(self.dir.root)) for p in removed)} "
                          f"(iterations.keep_models={self.config.iterations.keep_models})")
        return summary

    # --- 1. generate -----------------------------------------------------------------------------
    def generate(self, t: int) -> None:
        gen, partial, seed = self.config.generation, self.dir.partial(t, "generate"), stage_seed(self.config.seed, t, "generate")
        if gen.backend == "server":  # the policy stays on disk: the server loads it
            samples = sample_round(self.config, self.dir, t, self.prompts, seed=seed, progress_file=partial)
        else:
            model, tokenizer = self.policy(t - 1)
            with autocast(next(model.parameters()).device, self.compute_dtype):
                samples = generate_answers(
                    model, tokenizer, self.prompts, gen, self.config.data, num_samples=gen.num_samples, seed=seed,
                    progress_file=partial, source=str(self.config.data.prompts), description=f"iter {t} sampling",
                    keep_logps=True)  # the reference log-probs when the sampler is the reference
        sets = [CandidateSet(prompt=p.prompt, id=p.id, responses=[s.text for s in samples[p.id]],
                             n_tokens=[s.n_tokens for s in samples[p.id]],
                             truncated=[s.truncated for s in samples[p.id]], reference=p.reference,
                             target_length=p.target_length) for p in self.prompts]
        if ranks.is_main():
            write_sample_logps(self.dir.file(t, SAMPLE_LOGPS_FILE), self.prompts, samples)  # where decoding kept them
            write_jsonl(self.dir.file(t, "candidates.jsonl"), sets)
        distributed.remove_progress(partial)

    def sampler_is_reference(self) -> bool:
        """Round t samples from pi_{t-1}, its reference (iterations.reference previous): the train
        stage takes the reference log-probs kept while sampling (ilrdpo.sampled_reference), where the
        loss uses plain sums of log-probs and the model is scored in float32 as it decoded."""
        config = self.config
        return (config.iterations.reference == "previous" and config.model.lora is None
                and config.loss.type not in REFERENCE_FREE and config.loss.type != "ld_dpo"
                and self.compute_dtype == torch.float32)

    # --- 2. score --------------------------------------------------------------------------------
    def score(self, t: int) -> None:
        """Score every answer; finished prompts go to scores.partial.jsonl as they complete.
        Re-entrant: candidates.jsonl may already hold scores from a killed earlier attempt."""
        path = self.dir.file(t, "candidates.jsonl")
        sets = read_candidates(path, self.dir.redo_hint(t))
        progress_file = self.dir.partial(t, "score")
        scored = {row["id"]: row for row in distributed.read_progress(progress_file)}
        by_id = {p.id: p for p in self.prompts}
        settings = self.config.scoring
        per_chunk = max(1, settings.batch_size // max(1, self.config.generation.num_samples))
        todo = [c for c in sets if c.id not in scored]
        with progress_bar("scoring", len(sets), done=len(sets) - len(todo)) as bar:
            starts = range(0, len(todo), per_chunk)
            for k in ranks.mine(len(starts)):  # chunk k to process k % W
                chunk = todo[starts[k]:starts[k] + per_chunk]
                prompts = [by_id[c.id] for c in chunk for _ in c.responses]
                quality = score_in_batches(self.scorer, prompts, [r for c in chunk for r in c.responses],
                                           settings.batch_size)
                offset = 0
                for c in chunk:
                    q = quality[offset:offset + len(c.responses)]
                    offset += len(c.responses)
                    scored[c.id] = {"id": c.id, "quality": q, "rewards": shaped_rewards(q, c.n_tokens, self.scorer)}
                    distributed.append_progress(progress_file, scored[c.id])
                bar.advance(len(chunk))
        scored = ranks.gather_dict(scored)
        for c in sets:
            c.quality, c.rewards = scored[c.id]["quality"], scored[c.id]["rewards"]
        if ranks.is_main():
            write_jsonl(path, sets)
        distributed.remove_progress(progress_file)

    # --- 3. pair ---------------------------------------------------------------------------------
    def pair(self, t: int) -> None:
        path = self.dir.file(t, "candidates.jsonl")
        scoring = self.config.scoring
        sets = read_candidates(path, self.dir.redo_hint(t))
        if self.config.loss.target_length == "base":
            targets = base_targets(read_candidates(self.dir.file(1, "candidates.jsonl"), self.dir.redo_hint(1)))
            for c in sets:
                c.target_length = targets.get(c.id, c.target_length)
        pairs = pair_all(sets, self.config.pairing, seed=stage_seed(self.config.seed, t, "pair"),
                         tie_tolerance=scoring.tie_tolerance)
        if not pairs:
            census = pairing_census(sets, self.config.pairing, tie_tolerance=scoring.tie_tolerance)
            raise UserInputError(f"{path}: {no_pairs_message(census, self.config, t, self.state.touched())}")
        if ranks.is_main():
            write_jsonl(self.dir.file(t, "pairs.jsonl"), pairs)

    # --- 4. train --------------------------------------------------------------------------------
    def decide_alpha(self, t: int, pairs: list[PreferencePair], tokenizer) -> float:
        """The per-unit alpha of iteration t: decided when its train stage first starts (the
        config's loss.alpha, or alpha control from round t's own sampled lengths against round 1's,
        then alpha.per_unit_alpha as `ilrdpo train` does) and recorded in state.json; a resumed
        stage keeps it, unless --force, which lets the config decide again."""
        if t in self.state.alpha and not self.force:
            return self.state.alpha[t]
        alpha = self.config.loss.alpha
        budget = self.config.iterations.alpha_control.budget
        if budget is not None and t > 1:
            previous = self.state.alpha_setting.get(t - 1, alpha)
            sampled, initial = self._sampled_length(t), self._sampled_length(1)
            alpha = next_alpha(previous, sampled, initial, budget, start=self.config.loss.alpha)
            console.print(f"iteration {t}: alpha {previous:.4g} -> {alpha:.4g} (alpha control: this round's samples "
                          f"{sampled:.1f} tokens on average, the first round's {initial:.1f})")
        self.state.alpha_setting[t] = alpha
        alpha = per_unit_alpha(alpha, self.config, pairs, tokenizer)
        self.state.alpha[t] = alpha
        self.state.save()
        return alpha

    def _sampled_length(self, t: int) -> float:
        """Mean token count of round t's sampled answers (candidates.jsonl)."""
        sets = read_candidates(self.dir.file(t, "candidates.jsonl"), self.dir.redo_hint(t))
        counts = [n for c in sets for n in c.n_tokens]
        return sum(counts) / max(len(counts), 1)

    def _eval_summary(self, t: int) -> dict:
        """eval.json of iteration t with the alpha it trained with (state.json's, its one home)."""
        with finished_output(self.dir.redo_hint(t)):
            return {**read_json_file(self.dir.file(t, "eval.json")), "alpha": self.state.alpha.get(t) if t else None}

    def train(self, t: int) -> None:
        config = self.config
        with finished_output(self.dir.redo_hint(t)):
            pairs = read_pairs(self.dir.file(t, "pairs.jsonl"))
        if config.loss.target_length == "base" and any(p.target_length is None for p in pairs):
            raise UserInputError(f"{self.dir.file(t, 'pairs.jsonl')}: loss.target_length is 'base' but these pairs "
                                 "carry no target_length (made by a run without it); rerun the pair stage")
        # per-prompt targets ('base') travel with the pairs
        target = None if config.loss.target_length == "base" else config.loss.target_length
        loss = config.loss.model_copy(update={"target_length": target})
        lora = config.model.lora is not None
        ref_logps = self._sampled_reference(t, pairs, loss)
        if config.iterations.reference == "initial" and t > 1 and not lora:
            # pi_ref = pi_0 under full fine-tuning: score the pairs with pi_0 first, then free it,
            # so two models are never in memory together (reference log-probs do not depend on alpha).
            model, tokenizer = self.policy(0)
            ref_logps = pair_reference_logps(model, tokenizer, pairs, loss, config.train, config.data,
                                             compute_dtype=self.compute_dtype)
        model, tokenizer = self.policy(t - 1)
        alpha = self.decide_alpha(t, pairs, tokenizer)
        loss = loss.model_copy(update={"alpha": alpha})
        result = train_round(model, tokenizer, pairs, loss=loss, train=config.train, data=config.data,
                             output_dir=self.dir.iteration(t), seed=stage_seed(config.seed, t, "train"), ref_logps=ref_logps,
                             ref_adapter_disabled=lora and config.iterations.reference == "initial",
                             hparams={**hyperparameters(config), "loss.alpha": alpha},
                             compute_dtype=self.compute_dtype, checkpoint_dir=self.dir.checkpoint(t),
                             tracker=self.tracker, step_offset=self.steps_before(t), engine=self.engine)
        if ranks.is_main():
            atomic_write_text(self.dir.file(t, "ref_logps.json"), json.dumps(result.ref_logps))
        card = {"title": f"iLR-DPO iteration {t}", "base_model": config.model.name_or_path,
                "method": f"iterative {method_name(loss.type, alpha)}",
                "data": f"{len(pairs)} self-generated pairs",
                "hyperparameters": {**hyperparameters(config), "loss.alpha": alpha}, "metrics": result.final}
        self.engine.save(model, tokenizer, self.dir.file(t, "model"), card,
                         merge_lora=needs_merged_weights(config), dtype=self.compute_dtype)
        fault_point("model")
        # trained in place: the model in memory is now pi_t, unless the engine sharded it for
        # training (then the next stage loads the saved one whole)
        self.model_iteration = t if self.engine.release(model) else -1

    def _sampled_reference(self, t: int, pairs: list[PreferencePair], loss) -> torch.Tensor | None:
        """Round t's reference log-probs from its samples (sample_logps.jsonl), the pairs whose
        tokens differ forwarded; None where the generate stage kept none."""
        sampled = read_sample_logps(self.dir.file(t, SAMPLE_LOGPS_FILE)) if self.sampler_is_reference() else {}
        if not sampled:
            return None
        model, tokenizer = self.policy(t - 1)
        ref_logps, forwarded = sampled_reference_logps(model, tokenizer, pairs, sampled, loss, self.config.train,
                                                       self.config.data, compute_dtype=self.compute_dtype)
        console.print(f"iteration {t}: reference log-probs of {len(pairs) - forwarded} of {len(pairs)} pairs taken "
                      f"while sampling, {forwarded} by a forward pass")
        return ref_logps

    # --- 5. evaluate -----------------------------------------------------------------------------
    def evaluate(self, t: int) -> dict:
        return evaluate_iteration(
            t, rundir=self.dir, config=self.config, prompts=self.eval_prompts, judge=self.judge,
            judge_settings=self.judge_settings, policy=self.policy, compute_dtype=self.compute_dtype)




def run_iterations(config: Config, force: bool = False, scorer: Scorer | None = None,
                   until: tuple[int, str] | None = None, redo: tuple[int, str] | None = None) -> list[dict]:
    """`ilrdpo run`: all iterations, resuming whatever is already finished in output_dir.
    scorer: a Scorer object used instead of the one the scoring section describes.
    until: (t, stage) to stop after that stage (the demo's shared first steps).
    redo: (t, stage) to compute again from, with everything after it (replaced files kept in replaced/)."""
    run = IterativeRun(config, force, scorer, redo)
    with interrupts.where(), run.dir.opened("ilrdpo run", run.open):
        summaries = run.run(until)
        if until is not None:
            return summaries
        if config.model.push_to_hub:
            publish_final_model(run.dir, config, summaries)
    print_run_summary(run.dir, config, summaries)
    return summaries


def publish_final_model(rundir: RunDir, config: Config, summaries: list[dict]) -> str:
    """The final iteration's model, its card completed with every iteration's evaluation, to the hub."""
    folder = rundir.file(config.iterations.count, "model")
    info = json.loads((folder / "ilrdpo.json").read_text())
    info["eval"] = summaries
    if ranks.is_main():
        atomic_write_text(folder / "README.md", model_card(info))
    url = push_to_hub(folder, config.model.push_to_hub)
    console.print(f"uploaded: {url}")
    return url

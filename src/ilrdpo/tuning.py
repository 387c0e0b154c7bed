"""`ilrdpo tune`: hyperparameter search with optuna, each trial a real short `ilrdpo run`.

    OUT/                     the study folder (config.output_dir)
      study.db               optuna's SQLite storage: resumable, shareable by several processes
      shared/                iteration 0's evaluation and iteration 1's samples and scores, computed
                             once: they do not depend on the searched settings (checked)
      trial_NNN/             one run directory per trial
      best.yaml | pareto/    ready-to-run configs of the best trial (one objective) or the Pareto set
      plots/                 optimisation history, parameter importances, Pareto front

Objectives are keys of the last iteration's eval.json ("vs_initial_quality.lc_win_rate",
"quality_mean", "length.tokens_mean"...) with a direction. One objective is reported after every
iteration, so the median pruner can stop a poor trial early; several give a Pareto front.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from ilrdpo.config import Config, SearchDimension, build_config, config_to_yaml, override
from ilrdpo.errors import IlrdpoError, UserInputError
from ilrdpo.files import atomic_write_text
from ilrdpo.progress import console
from ilrdpo.resume import stage_dependencies
from ilrdpo.rundir import RunDir
from ilrdpo.scoring import Scorer

# Used when tune.space is empty. Why these ranges:
# - train.learning_rate: preference fine-tuning of a full model works from ~1e-7 (7B, TRL's
#   default 5e-7) to ~1e-5 (sub-1B models, few steps); LoRA wants up to ~1e-4. Log scale.
# - loss.beta: DPO papers use 0.01-0.5; smaller lets the policy drift further from pi_ref.
# - loss.alpha: per token, the length term alpha * gap should be comparable to beta * delta
#   (a few logits at most): with gaps of 10-50 tokens that is alpha in [0, 0.1].
DEFAULT_SPACE = {
    "train.learning_rate": SearchDimension(type="log_uniform", low=1e-7, high=1e-4),
    "loss.beta": SearchDimension(type="log_uniform", low=0.01, high=0.5),
    "loss.alpha": SearchDimension(type="uniform", low=0.0, high=0.1),
}


def search_space(config: Config) -> dict[str, SearchDimension]:
    return dict(config.tune.space or DEFAULT_SPACE)


def parse_objectives(config: Config) -> list[tuple[str, str]]:
    """[(eval.json key, 'maximize' | 'minimize')], checked before any trial runs."""
    objectives = []
    for spec in config.tune.objectives:
        key, _, direction = spec.rpartition(":")
        if not key or direction not in ("maximize", "minimize"):
            raise UserInputError(f"config key 'tune.objectives': '{spec}' is not 'eval.json key:maximize' or ':minimize'")
        objectives.append((key, direction))
    if not objectives:
        raise UserInputError("config key 'tune.objectives': give at least one objective")
    if not config.data.eval_prompts and any(not k.startswith(("gen/", "pairs/")) for k, _ in objectives):
        raise UserInputError("config key 'tune.objectives': evaluation objectives need data.eval_prompts")
    return objectives


def metric(summary: dict[str, Any], key: str) -> float:
    """A dotted key of an eval.json, as a float."""
    value: Any = summary
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise UserInputError(f"config key 'tune.objectives': '{key}' is not in eval.json (it has "
                                 f"{', '.join(sorted(summary))})")
        value = value[part]
    return float(value)


def sample_params(trial, space: dict[str, SearchDimension]) -> dict[str, Any]:
    params = {}
    for key, dim in space.items():
        if dim.type == "categorical":
            params[key] = trial.suggest_categorical(key, dim.choices)
        elif dim.type == "int":
            params[key] = trial.suggest_int(key, int(dim.low), int(dim.high))
        else:
            params[key] = trial.suggest_float(key, dim.low, dim.high, log=dim.type == "log_uniform")
    return params


def trial_config(config: Config, params: dict[str, Any], output_dir: Path) -> Config:
    raw = config.model_dump(mode="json")
    raw["output_dir"] = str(output_dir)
    return build_config(raw, [override(k, v) for k, v in params.items()], source="tune")


def shareable(space: dict[str, SearchDimension]) -> bool:
    """Iteration 0's eval and iteration 1's samples and scores are shared when no searched key is
    read by those stages."""
    deps = stage_dependencies(1, "score") + stage_dependencies(0, "eval")
    return not any(key == d or key.startswith(d + ".") for key in space for d in deps)


def prepare_shared(config: Config, folder: Path, scorer: Scorer | None = None) -> RunDir:
    """Run the shared stages once (resumable like any run)."""
    from ilrdpo.loop import IterativeRun

    run = IterativeRun(config.model_copy(update={"output_dir": str(folder)}), scorer=scorer)
    with run.dir.opened("ilrdpo tune (shared first round)", run.open):
        if run.eval_prompts:
            run.run_stage(0, "eval")
        run.run_stage(1, "generate")
        run.run_stage(1, "score")
    return run.dir


def make_sampler(config: Config, n_objectives: int, n_trials: int):
    """Gaussian-process BO for one objective and up to 30 trials, TPE beyond, NSGA-II for several
    objectives; seeded with the run's seed."""
    import optuna

    kind = "nsga2" if n_objectives > 1 else ("gp" if n_trials <= 30 else "tpe")
    seed = config.seed
    return {"gp": lambda: optuna.samplers.GPSampler(seed=seed),
            "tpe": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=True),
            "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed)}[kind]()


def tune(config: Config, *, trials: int, storage: str | None = None, study_name: str | None = None,
         resume: bool = False, scorer: Scorer | None = None) -> Any:
    """Run `trials` more trials of the study; returns the optuna Study. scorer: used instead of the
    one the scoring section describes (the demo's judge)."""
    import optuna

    objectives = parse_objectives(config)
    space = search_space(config)
    out = Path(config.output_dir)
    storage = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    study_name = study_name or out.name
    out.mkdir(parents=True, exist_ok=True)
    if not resume and optuna.study.get_all_study_names(storage).count(study_name):
        raise UserInputError(f"{storage}: study '{study_name}' exists; pass --resume to add trials to it, or "
                             "choose another output_dir or --study")
    rdb = optuna.storages.RDBStorage(storage, heartbeat_interval=60, grace_period=120)
    single = len(objectives) == 1
    study = optuna.create_study(
        storage=rdb, study_name=study_name, load_if_exists=resume,
        directions=[d for _, d in objectives], sampler=make_sampler(config, len(objectives), trials),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2) if single else None)
    shared = prepare_shared(config, out / "shared", scorer) if shareable(space) else None
    if shared is None:
        console.print("[yellow]the search space reaches sampling or scoring: every trial samples on its own[/yellow]")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(lambda trial: _objective(trial, config, space, objectives, shared, out, scorer), n_trials=trials,
                   catch=(Exception,))
    write_outputs(study, config, space, objectives, out)
    return study


def _objective(trial, config: Config, space, objectives, shared: RunDir | None, out: Path,
               scorer: Scorer | None = None):
    import optuna

    from ilrdpo.loop import run_iterations

    params = sample_params(trial, space)
    folder = out / f"trial_{trial.number:03d}"
    trial.set_user_attr("run_dir", str(folder))
    config = trial_config(config, params, folder)
    if shared is not None and not RunDir(folder).state_path.exists():
        RunDir(folder).adopt(shared, {0: ["eval"] if config.data.eval_prompts else [], 1: ["generate", "score"]})
    try:
        for t in range(1, config.iterations.count + 1):
            summary = run_iterations(config.model_copy(update={"iterations": config.iterations.model_copy(
                update={"count": t})}), scorer=scorer)[-1]
            if len(objectives) == 1 and t < config.iterations.count:  # a finished trial is kept
                trial.report(metric(summary, objectives[0][0]), t)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after iteration {t}")
    except optuna.TrialPruned:
        raise
    except Exception as error:
        trial.set_user_attr("error", f"{type(error).__name__}: {error}" if not isinstance(error, IlrdpoError)
                            else str(error))
        raise
    values = [metric(summary, key) for key, _ in objectives]
    # what `ilrdpo report` shows of a run that came from a study
    atomic_write_text(RunDir(folder).trial_path, json.dumps({
        "study": str(out), "trial": trial.number, "params": params,
        "objectives": {f"{key} ({direction})": value for (key, direction), value in zip(objectives, values)}},
        indent=1, default=str))
    return values[0] if len(values) == 1 else values


def write_outputs(study, config: Config, space, objectives, out: Path) -> None:
    """best.yaml (or pareto/trial_NNN.yaml), plots/ and the terminal table."""
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    print_table(study, space, objectives)
    if not done:
        console.print("[yellow]no trial completed[/yellow]")
        return
    best = study.best_trials if len(objectives) > 1 else [study.best_trial]
    for trial in best:
        params = {k: trial.params[k] for k in space if k in trial.params}
        ready = trial_config(config, params, out / "best_run").model_copy(update={"tune": config.tune})
        target = out / "best.yaml" if len(objectives) == 1 else out / "pareto" / f"trial_{trial.number:03d}.yaml"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f"# trial {trial.number}: {dict(zip([k for k, _ in objectives], trial.values))}\n"
                          + config_to_yaml(ready))
    write_plots(study, objectives, out / "plots")
    console.print(f"study: {out / 'study.db'}  best: {out / ('best.yaml' if len(objectives) == 1 else 'pareto')}")


def write_plots(study, objectives, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    folder.mkdir(parents=True, exist_ok=True)
    names = [k for k, _ in objectives]
    plots = {"history.png": lambda: vis.plot_optimization_history(study, target_name=names[0],
                                                                  target=(lambda t: t.values[0]) if len(names) > 1
                                                                  else None)}
    if len([t for t in study.trials if t.values]) >= 2 and len(study.trials[0].params) > 1:
        plots["importances.png"] = lambda: vis.plot_param_importances(
            study, target=(lambda t: t.values[0]) if len(names) > 1 else None, target_name=names[0])
    if len(names) > 1:
        plots["pareto.png"] = lambda: vis.plot_pareto_front(study, target_names=names)
    for name, draw in plots.items():
        axes = draw()
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.savefig(folder / name, dpi=100, bbox_inches="tight")
        plt.close(figure)


def print_table(study, space, objectives) -> None:
    table = Table("trial", "state", *[k.split(".")[-1] for k in space], *[k for k, _ in objectives],
                  title=f"study {study.study_name}")
    for trial in study.trials:
        values = [f"{v:.4g}" for v in trial.values] if trial.values else [
            str(trial.user_attrs.get("error", ""))[:30]] + [""] * (len(objectives) - 1)
        table.add_row(str(trial.number), trial.state.name.lower(),
                      *[f"{trial.params[k]:.3g}" if isinstance(trial.params.get(k), float) else str(trial.params.get(k))
                        for k in space], *values)
    console.print(table)

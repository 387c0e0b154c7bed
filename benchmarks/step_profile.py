"""Where a training step's time goes: torch.profiler over the timed optimizer steps of
train_throughput.py's ilrdpo worker (`--profile`), summarised as the operators that take the most
device time (CUDA) or CPU time (CPU) per step; and the same summary of one call
(generation_throughput.py `--profile`: one sampling run).

The profiler follows the optimizer: a global optimizer step hook advances its schedule, so it
skips the setup, the reference pass and the warmup steps and records exactly the timed steps.
Profiling slows the steps it records (more on the CPU side), so the throughput of a profiled run
is not reported: `--profile` is its own invocation, after the unprofiled one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile, schedule

TOP = 12  # operators listed


@contextlib.contextmanager
def profiled_steps(warmup: int, steps: int, device: str) -> Iterator[list[str]]:
    """Profile optimizer steps warmup+1 .. warmup+steps of what runs inside; the summary lines
    are appended to the yielded list when the block ends."""
    if warmup < 1:
        raise SystemExit("--profile needs --warmup 1 or more (the first step's interval holds the setup)")
    lines: list[str] = []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    # interval k lies between the k-th and (k+1)-th optimizer step ends: the timed steps are
    # intervals warmup .. warmup+steps-1
    prof = profile(activities=activities, schedule=schedule(wait=warmup - 1, warmup=1, active=steps, repeat=1))
    hook = register_optimizer_step_post_hook(lambda *_: prof.step())
    try:
        with prof:
            yield lines
    finally:
        hook.remove()
    lines.extend(summary(prof, device, steps))


def summary(prof, device: str, steps: int, unit: str = "step") -> list[str]:
    """The top operators by self time on the device (CUDA) or the CPU, per step (or per `unit`)."""
    events = prof.key_averages()
    on_device = device == "cuda"

    def self_us(event) -> float:
        if on_device:
            return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)
        return event.self_cpu_time_total

    total = sum(self_us(e) for e in events)
    cpu_total = sum(e.self_cpu_time_total for e in events)
    where = "device" if on_device else "CPU"
    lines = [f"profile: {steps} {unit}s; self {where} time {total / 1e3 / steps:.1f} ms a {unit}"
             + (f", self CPU time {cpu_total / 1e3 / steps:.1f} ms a {unit}" if on_device else "")]
    for event in sorted(events, key=self_us, reverse=True)[:TOP]:
        share = 100 * self_us(event) / total if total else 0.0
        lines.append(f"profile: {self_us(event) / 1e3 / steps:8.2f} ms a {unit} {share:5.1f}%  {event.key[:70]} "
                     f"({event.count // steps} calls a {unit})")
    return lines


def profiled_call(fn, device: str, unit: str) -> list[str]:
    """The summary lines of one call of fn (e.g. one generation run, after its untimed first run)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
    return summary(prof, device, 1, unit)

"""
Frontier mode: each method's held-out reward gain against its KL to the reference, over a sweep of its `beta` (the
`<method>_betas` settings), with the data, LoRA, optimiser and budget of comparison mode; and each method's gain
interpolated at matched KLs, the fair way to compare methods that move different distances from the reference.
"""

import json
import os
import time

import numpy as np

from . import plots
from .compare import MethodTrainer
from .config import METHODS, DemoConfig
from .pipeline import StageTimer, prepare


# The figures of a point in frontier.json; frontier_details.json has all of them
POINT_KEYS = ("beta", "kl", "reward_difference", "reward_difference_ci95", "win_rate")
# KLs (nats per completion) at which methods are compared, where their curves reach
MATCHED_KLS = (0.1, 0.3, 1.0, 3.0)


def gain_at_kl(points: list[dict], kl: float) -> float | None:
    """A method's reward gain at `kl`, interpolated linearly in log KL between its two points around it (sorted by
    KL); None outside the KLs its points cover."""
    points = sorted(points, key=lambda point: point["kl"])
    kls = np.array([point["kl"] for point in points])
    if not (len(points) and kls[0] <= kl <= kls[-1] and kls[0] > 0):
        return None
    return float(np.interp(np.log(kl), np.log(kls), [point["reward_difference"] for point in points]))


def format_frontier(methods: dict[str, list[dict]]) -> str:
    """Text tables: every point of every method, then each method's gain at the matched KLs."""
    lines = [f"{'method':<20} {'beta':>6}  {'KL [95% CI]':<20} {'per token':>9}  {'gain [95% CI]':<25} {'win':>5}"]
    for name, points in methods.items():
        for point in points:
            kl_low, kl_high = point["kl_ci95"]
            low, high = point["reward_difference_ci95"]
            lines.append(
                f"{name:<20} {point['beta']:>6g}  {point['kl']:5.2f} [{kl_low:5.2f}, {kl_high:5.2f}]  "
                f"{point['kl_per_token']:>9.3f}  {point['reward_difference']:+.3f} [{low:+.3f}, {high:+.3f}]  "
                f"{point['win_rate']:>5.3f}"
            )
    lines += ["", "gain at matched KL (interpolated in log KL; - : outside the method's range)"]
    lines.append(f"{'method':<20} " + " ".join(f"{f'KL {kl:g}':>8}" for kl in MATCHED_KLS))
    for name, points in methods.items():
        gains = [gain_at_kl(points, kl) for kl in MATCHED_KLS]
        lines.append(f"{name:<20} " + " ".join(f"{'-' if g is None else f'{g:+.3f}':>8}" for g in gains))
    return "\n".join(lines)


def run_frontier(config: DemoConfig) -> dict:
    """Trains and evaluates every method at each of its betas; writes `frontier.json`, `frontier_details.json` (every
    figure, the training logs, the stage times) and `frontier.png` to `config.output_dir`."""
    start = time.perf_counter()
    timer = StageTimer()
    setup = prepare(config, timer)
    trainer = MethodTrainer(config, setup)
    methods, logs = {}, {}
    for method in config.methods:
        for beta in getattr(config, f"{method}_betas"):
            figures, log = trainer.train_and_evaluate(method, beta, f"{method}_beta{beta:g}", timer)
            methods.setdefault(METHODS[method], []).append({"beta": beta, **figures})
            logs[f"{METHODS[method]}, beta {beta:g}"] = log

    points_only = {name: [{key: p[key] for key in POINT_KEYS} for p in points] for name, points in methods.items()}
    frontier = {"methods": points_only}
    details = {
        "model": setup.path,
        "config": vars(config),
        "max_steps": trainer.max_steps,
        "reference": setup.reference,
        "methods": methods,
        "gain_at_matched_kl": {
            name: {f"{kl:g}": gain_at_kl(points, kl) for kl in MATCHED_KLS} for name, points in methods.items()
        },
        "training_logs": logs,
        "stage_seconds": timer.seconds,
        "total_seconds": time.perf_counter() - start,
    }
    for name, value in [("frontier.json", frontier), ("frontier_details.json", details)]:
        with open(os.path.join(config.output_dir, name), "w") as file:
            json.dump(value, file, indent=2)
    plots.frontier(methods, os.path.join(config.output_dir, "frontier.png"))
    print("\n" + format_frontier(methods))
    print(f"\nTotal: {details['total_seconds']:.0f} s. Results and plot in {config.output_dir}/")
    return details

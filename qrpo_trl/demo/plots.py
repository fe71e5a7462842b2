"""The demo's PNG plots (matplotlib, Agg backend: no display needed)."""

import matplotlib


matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing running mean, so that noisy per-step values show a trend."""
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    starts = np.arange(1, len(values) + 1) - counts
    return (cumulative[1:] - cumulative[starts]) / counts


def reward_distributions(reference: dict, policies: dict[str, dict], path: str) -> None:
    """Held-out rewards: their distribution per model, and each prompt's mean reward, policy against reference."""
    figure, (histogram, scatter) = plt.subplots(1, 2, figsize=(11, 4.2))
    bins = np.linspace(0, 1, 21)
    for name, summary in {"reference": reference, **policies}.items():
        rewards = np.ravel(summary["rewards"])
        histogram.hist(rewards, bins=bins, histtype="step", linewidth=2, label=f"{name} (mean {rewards.mean():.3f})")
    histogram.set(xlabel="reward of a held-out completion", ylabel="completions", title="Held-out reward distribution")
    histogram.legend(loc="upper left")

    reference_means = np.mean(reference["rewards"], axis=1)
    for name, summary in policies.items():
        scatter.scatter(reference_means, np.mean(summary["rewards"], axis=1), label=name, alpha=0.7)
    low = min(reference_means.min(), *(np.mean(s["rewards"], axis=1).min() for s in policies.values())) - 0.05
    high = max(reference_means.max(), *(np.mean(s["rewards"], axis=1).max() for s in policies.values())) + 0.05
    scatter.plot([low, high], [low, high], color="gray", linestyle="--", linewidth=1, label="no change")
    scatter.set(
        xlim=(low, high), ylim=(low, high), xlabel="reference: mean reward of the prompt",
        ylabel="policy: mean reward of the prompt", title="Per held-out prompt (above the line: improved)",
    )
    scatter.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def training_curves(log_history: list[dict], path: str) -> None:
    """Per-step training metrics of a QRPO run: loss, regression fit, quantile of the batch."""
    entries = [entry for entry in log_history if "loss" in entry and "target" in entry]
    steps = np.array([entry["step"] for entry in entries])
    window = max(1, len(entries) // 10)

    def series(key):
        return np.array([entry[key] for entry in entries], dtype=np.float64)

    figure, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    panels = [
        ("Loss", [("loss", "loss")], "squared residual"),
        (
            "Regression: beta * log-ratio vs target",
            [("rewards/implicit", "beta * (log pi_theta - log pi_ref)"), ("target", "target f(q) - beta log Z")],
            "batch mean",
        ),
        ("Training samples", [("log_ratio", "log pi_theta - log pi_ref"), ("quantile", "quantile q")], "batch mean"),
    ]
    for axis, (title, keys, ylabel) in zip(axes, panels, strict=True):
        for key, label in keys:
            values = series(key)
            (line,) = axis.plot(steps, values, alpha=0.3, linewidth=1)
            axis.plot(steps, _smooth(values, window), color=line.get_color(), linewidth=2, label=label)
        axis.set(title=title, xlabel="step", ylabel=ylabel)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def reward_vs_kl(methods: dict[str, dict], path: str) -> None:
    """Each method's held-out reward gain (95% CI) against its KL to the reference."""
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for name, result in methods.items():
        low, high = result["reward_difference_ci95"]
        difference = result["reward_difference"]
        axis.errorbar(
            result["kl"], difference, yerr=[[difference - low], [high - difference]], fmt="o", capsize=4, label=name
        )
    axis.axhline(0, color="gray", linestyle="--", linewidth=1)
    axis.set(
        xlabel="KL to the reference (nats per completion)", ylabel="held-out reward - reference (95% CI)",
        title="Reward gain against KL, same data and budget",
    )
    axis.legend(fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def frontier(methods: dict[str, list[dict]], path: str) -> None:
    """Each method's held-out reward gain against its KL to the reference (95% CIs), one line through its betas."""
    figure, axis = plt.subplots(figsize=(7.5, 5))
    for name, points in methods.items():
        points = sorted(points, key=lambda point: point["kl"])
        kl = np.array([point["kl"] for point in points])
        gain = np.array([point["reward_difference"] for point in points])
        gain_ci = np.array([point["reward_difference_ci95"] for point in points])
        kl_ci = np.array([point["kl_ci95"] for point in points])
        axis.errorbar(
            kl, gain, yerr=[gain - gain_ci[:, 0], gain_ci[:, 1] - gain], xerr=[kl - kl_ci[:, 0], kl_ci[:, 1] - kl],
            fmt="o-", capsize=3, label=name, alpha=0.85,
        )
        for point in points:
            axis.annotate(f"{point['beta']:g}", (point["kl"], point["reward_difference"]), fontsize=7,
                          textcoords="offset points", xytext=(4, 4))
    axis.axhline(0, color="gray", linestyle="--", linewidth=1)
    # KLs span decades; symlog keeps a policy that did not move (KL 0) on the plot
    axis.set_xscale("symlog", linthresh=0.1)
    axis.set_xlim(left=0)  # a KL is >= 0: no negative decades
    axis.set(
        xlabel="KL to the reference (nats per completion, 95% CI)", ylabel="held-out reward - reference (95% CI)",
        title="Reward gain against KL over beta (labels), same data and budget",
    )
    axis.legend(fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)

"""The math of the QRPO and RPO regression targets: pure float64 NumPy/SciPy, no model.

Both methods fit the closed-form optimum of KL-regularised RL,
``beta * log(pi*(y|x) / pi_ref(y|x)) = R(x, y) - beta * log Z(x)``, by regressing
``beta * (logp_theta - logp_ref)`` onto a target computed here once per sample:

- QRPO (Matrenok, Moalla, Gulcehre 2025): ``target = f(q) - beta * log Z_f`` where ``q`` is the quantile of the reward
  among rewards of reference-model samples for the same prompt, and ``Z_f`` has a closed form.
- RPO, Reward Partitioning Optimization (Faye, Azzag, Lebbah 2025): ``target = r - V(x)`` with the per-prompt value
  ``V(x) = tau * log sum_j pi_ref(y_j|x) exp(r_j / tau)`` over the dataset's completions of ``x``.

Partition functions are returned as ``beta * log Z`` in float64 and never go through ``exp(1/beta)``, which overflows
float64 for beta < 0.0014.
"""

import math

import numpy as np
from scipy.special import dawsn, logsumexp, ndtri


TRANSFORMS = ("identity", "log", "square", "sqrt", "normal_icdf", "scaled_normal_icdf")
PARTITIONS = ("exact", "finite_n", "approx")
TIES = ("le", "mid")
VALUE_ESTIMATORS = ("ref_weighted", "monte_carlo", "ref_weighted_rows")
LOGPS_NORMALIZATIONS = ("sum", "mean")
# The normal transforms clamp q to [1/n, (n-1)/n], an empty or single-point range below 3 references
MIN_REFERENCES = {"normal_icdf": 3, "scaled_normal_icdf": 3}
# Transforms whose clamping of q depends on the number of references n
TRANSFORMS_NEEDING_N = ("log", "normal_icdf", "scaled_normal_icdf")


def pad_ragged(rows: list) -> np.ndarray:
    """Stack lists of unequal length into a float64 matrix, padded with NaN (which every comparison treats as absent)."""
    width = max((len(row) for row in rows), default=0)
    out = np.full((len(rows), width), np.nan)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def own_reward_index(ref_rewards: np.ndarray, reward: float) -> int | None:
    """
    Index of the sample's own reward among its reference rewards, or None if it is not there: an exactly equal
    reference if there is one, else the nearest within `rtol=1e-6, atol=1e-9` (a reward stored at another precision).
    Another reference that is merely close must not be removed in place of the equal one.
    """
    ref_rewards = np.asarray(ref_rewards, dtype=np.float64)
    equal = np.flatnonzero(ref_rewards == reward)
    if equal.size:
        return int(equal[0])
    distances = np.abs(ref_rewards - reward)
    close = np.isclose(ref_rewards, reward, rtol=1e-6, atol=1e-9)
    return int(np.argmin(np.where(close, distances, np.inf))) if close.any() else None


def quantile_rewards(rewards: np.ndarray, ref_rewards: np.ndarray, ties: str = "le") -> np.ndarray:
    """
    Empirical quantile of each reward among its reference rewards.

    Args:
        rewards: shape `(N,)`.
        ref_rewards: shape `(N, n)`, NaN-padded where a row has fewer than `n` references.
        ties: `"le"` counts references `<=` the reward (the official code's right-continuous CDF); `"mid"` counts
            ties as one half (mid-rank), which removes the upward bias of `"le"` on discrete rewards.

    Returns:
        `q` of shape `(N,)`, in `[0, 1]`.
    """
    rewards = np.asarray(rewards, dtype=np.float64)[:, None]
    ref_rewards = np.asarray(ref_rewards, dtype=np.float64)
    counts = np.sum(~np.isnan(ref_rewards), axis=1)
    below = np.sum(ref_rewards < rewards, axis=1)
    equal = np.sum(ref_rewards == rewards, axis=1)
    if ties == "le":
        hits = below + equal
    elif ties == "mid":
        hits = below + 0.5 * equal
    else:
        raise ValueError(f"Unknown ties {ties!r}; expected one of {TIES}.")
    return hits / counts


def transform_quantiles(q, transform: str, n=None, scale=None) -> np.ndarray:
    """
    The transform `f(q)` applied to quantile rewards.

    `log` clamps `q` to `>= 1/n`; `normal_icdf` and `scaled_normal_icdf` clamp it to `[1/n, (n-1)/n]`, where `n` is
    the number of references (scalar or per row). `scaled_normal_icdf` multiplies by the per-prompt `scale`
    (sigma_x).
    """
    q = np.asarray(q, dtype=np.float64)
    if transform in TRANSFORMS_NEEDING_N:
        if n is None:
            raise ValueError(f"transform={transform!r} clamps q by 1/n and needs the number of references n.")
        n = np.asarray(n, dtype=np.float64)
    if transform == "identity":
        return q
    if transform == "log":
        return np.log(np.maximum(q, 1.0 / n))
    if transform == "square":
        return q**2
    if transform == "sqrt":
        return np.sqrt(q)
    if transform in ("normal_icdf", "scaled_normal_icdf"):
        values = ndtri(np.clip(q, 1.0 / n, (n - 1.0) / n))
        if transform == "normal_icdf":
            return values
        if scale is None:
            raise ValueError("transform='scaled_normal_icdf' needs the per-prompt scale sigma_x.")
        return np.asarray(scale, dtype=np.float64) * values
    raise ValueError(f"Unknown transform {transform!r}; expected one of {TRANSFORMS}.")


def _exact_beta_log_partition(transform: str, beta, scale=None):
    """`beta * log Z` for q ~ Uniform(0, 1), in the closed forms that stay finite for any beta > 0 (scalar or array)."""
    if transform == "identity":  # Z = beta * (exp(1/beta) - 1)
        return beta * np.log(beta) + 1.0 + beta * np.log1p(-np.exp(-1.0 / beta))
    if transform == "log":  # Z = beta / (1 + beta)
        return beta * np.log(beta) - beta * np.log1p(beta)
    if transform == "square":  # Z = sqrt(pi * beta) / 2 * erfi(1 / sqrt(beta)), written with Dawson's function
        return 1.0 + beta * np.log(np.sqrt(beta) * dawsn(1.0 / np.sqrt(beta)))
    if transform == "sqrt":  # Z = 2 * beta * (beta + (1 - beta) * exp(1/beta))
        return beta * np.log(2.0 * beta) + 1.0 + beta * np.log(1.0 - beta + beta * np.exp(-1.0 / beta))
    if transform == "normal_icdf":  # Z = E[exp(X / beta)], X ~ N(0, 1)
        return 1.0 / (2.0 * beta)
    if transform == "scaled_normal_icdf":
        return np.asarray(scale, dtype=np.float64) ** 2 / (2.0 * beta)
    raise ValueError(f"Unknown transform {transform!r}; expected one of {TRANSFORMS}.")


def _finite_n_beta_log_partition(transform: str, beta, n, scale=None) -> np.ndarray:
    """`beta * log Z_n` with `Z_n = 1/(n+1) sum_k exp(f(k/n) / beta)`: q is discrete-uniform on {0, 1/n, ..., 1}."""
    scaled = transform == "scaled_normal_icdf"
    n, beta, scale = np.broadcast_arrays(
        np.asarray(n, dtype=np.int64),
        np.asarray(beta, dtype=np.float64),
        np.asarray(scale if scaled else 1.0, dtype=np.float64),
    )
    out = np.empty(n.shape, dtype=np.float64)
    for count in np.unique(n):
        rows = n == count
        grid = transform_quantiles(np.arange(count + 1) / count, "normal_icdf" if scaled else transform, n=count)
        # sigma_x * f(k/n) / beta: a different grid per row when sigma_x or beta varies
        exponents = (scale[rows] / beta[rows])[:, None] * grid[None, :]
        out[rows] = beta[rows] * (logsumexp(exponents, axis=1) - math.log(count + 1))
    return out


def beta_log_partition(transform: str, beta, partition: str = "exact", n=None, scale=None):
    """
    `beta * log Z_f`, the constant (per prompt for `scaled_normal_icdf`) subtracted from `f(q)` in the QRPO target.

    Args:
        transform: one of `TRANSFORMS`.
        beta: KL coefficient, `> 0`: a float, or one per row (`normalize_beta_by_length`).
        partition: `"exact"` (q continuous uniform, closed form), `"finite_n"` (q discrete-uniform on
            `{0, 1/n, ..., 1}`, exact for `n` references) or `"approx"` (the official README's `log(beta) + 1/beta`,
            identity only, which drops `beta * log(1 - exp(-1/beta))`).
        n: number of references, scalar or per row (needed by `"finite_n"`).
        scale: per-row sigma_x (needed by `scaled_normal_icdf`).

    Returns:
        A float, or an array with the shape of `beta`/`n`/`scale` when the value varies per row.
    """
    scalar_beta = np.ndim(beta) == 0
    beta = float(beta) if scalar_beta else np.asarray(beta, dtype=np.float64)
    if not np.all(np.asarray(beta) > 0):
        raise ValueError(f"beta must be > 0, got {beta}.")
    if transform == "scaled_normal_icdf" and scale is None:
        raise ValueError("transform='scaled_normal_icdf' needs the per-prompt scale sigma_x.")
    if partition == "exact":
        value = _exact_beta_log_partition(transform, beta, scale)
        return float(value) if np.ndim(value) == 0 else value
    if partition == "finite_n":
        if n is None:
            raise ValueError("partition='finite_n' needs the number of references n.")
        return _finite_n_beta_log_partition(transform, beta, n, scale)
    if partition == "approx":
        check_partition(transform, partition)
        value = beta * np.log(beta) + 1.0
        return float(value) if np.ndim(value) == 0 else value
    raise ValueError(f"Unknown partition {partition!r}; expected one of {PARTITIONS}.")


def check_partition(transform: str, partition: str) -> None:
    """Raise a ValueError if `partition` cannot be used with `transform`."""
    if partition == "approx" and transform != "identity":
        raise ValueError(
            f"`partition='approx'` is the official README's log Z = log(beta) + 1/beta, which only holds for "
            f"`transform='identity'`, not {transform!r}."
        )


def reference_stds(ref_rewards: np.ndarray) -> np.ndarray:
    """Per-row sample standard deviation (ddof=1) of NaN-padded reference rewards: sigma_x before normalisation."""
    return np.nanstd(np.asarray(ref_rewards, dtype=np.float64), axis=1, ddof=1)


def group_logsumexp(groups: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """`logsumexp` of `scores` within each group, for group labels `0..G-1`; returns shape `(G,)`."""
    groups = np.asarray(groups, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    num_groups = int(groups.max()) + 1 if groups.size else 0
    maxima = np.full(num_groups, -np.inf)
    np.maximum.at(maxima, groups, scores)
    sums = np.zeros(num_groups)
    np.add.at(sums, groups, np.exp(scores - maxima[groups]))
    return maxima + np.log(sums)


def label_means(labels, values) -> np.ndarray:
    """Per row, the mean of `values` over the rows that share its label (labels `0..L-1`)."""
    labels = np.asarray(labels, dtype=np.int64)
    return (np.bincount(labels, weights=np.asarray(values, dtype=np.float64)) / np.bincount(labels))[labels]


def rpo_values(
    groups, rewards, ref_logps, tau: float, estimator: str = "ref_weighted", completions=None
) -> np.ndarray:
    """
    Per-row value `V(x)` of RPO, over the rows that share the prompt's group label.

    - `"ref_weighted"` (the paper): `V = tau * log sum_y pi_ref(y|x) exp(r_y / tau)` over the DISTINCT completions `y`
      of `x` (rows with the same `completions` label), each counted once with the mean reward `r_y` of its rows, so
      that the optimum is a softmax over the distinct completions. Computed as `tau * logsumexp(logp_ref + r / tau)`
      because the direct sum of sequence probabilities underflows.
    - `"ref_weighted_rows"` (the official code): the same sum over rows, so a completion present k times counts k
      times and the optimum puts total probability below 1 on the completions.
    - `"monte_carlo"`: `V = tau * (logsumexp(r_j / tau) - log n_x)` over the rows, the Monte Carlo estimate of
      `tau * log E_ref[exp(r / tau)]`: the rows are independent draws from the reference model, so each counts.

    Args:
        groups: prompt label per row, `0..G-1`.
        completions: for `"ref_weighted"`, a label per row, equal for the rows holding the same completion of the same
            prompt (labels `0..D-1`).
    """
    if not tau > 0:
        raise ValueError(f"tau (beta) must be > 0, got {tau}.")
    groups = np.asarray(groups, dtype=np.int64)
    scores = np.asarray(rewards, dtype=np.float64) / tau
    if estimator == "ref_weighted":
        if completions is None:
            raise ValueError("value_estimator='ref_weighted' needs the completion label of every row.")
        # One term per distinct completion: the mean of its rows (their reference log-probs agree up to rounding)
        scores = label_means(completions, scores + np.asarray(ref_logps, dtype=np.float64))
        _, first_rows = np.unique(completions, return_index=True)
        values = group_logsumexp(groups[first_rows], scores[first_rows])
    elif estimator == "ref_weighted_rows":
        values = group_logsumexp(groups, scores + np.asarray(ref_logps, dtype=np.float64))
    elif estimator == "monte_carlo":
        values = group_logsumexp(groups, scores) - np.log(np.bincount(groups))
    else:
        raise ValueError(f"Unknown value_estimator {estimator!r}; expected one of {VALUE_ESTIMATORS}.")
    return tau * values[groups]


def monte_carlo_values(ref_rewards, tau: float) -> np.ndarray:
    """
    Per-row value `V(x) = tau * log(1/n sum_j exp(r_j / tau))` over each row's own reference rewards (a row of the
    NaN-padded matrix `pad_ragged` makes): RPO's Monte Carlo estimate from rewards of completions sampled from the
    reference model for `x`, whether or not those completions are rows of the dataset.
    """
    if not tau > 0:
        raise ValueError(f"tau (beta) must be > 0, got {tau}.")
    scores = np.asarray(ref_rewards, dtype=np.float64) / tau
    present = ~np.isnan(scores)
    return tau * (logsumexp(np.where(present, scores, -np.inf), axis=1) - np.log(present.sum(axis=1)))

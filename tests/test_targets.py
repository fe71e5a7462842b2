"""The math module against independent numerics: mpmath quadrature and sums, direct float64, the official loss."""

import math

import mpmath
import numpy as np
import pytest
import torch

from qrpo_trl.targets import (
    TRANSFORMS,
    beta_log_partition,
    label_means,
    monte_carlo_values,
    own_reward_index,
    pad_ragged,
    quantile_rewards,
    reference_stds,
    rpo_values,
    transform_quantiles,
)


mpmath.mp.dps = 40
BETAS = [0.003, 0.1, 0.5, 1.0, 2.0]


def quadrature_beta_log_z(transform: str, beta: float, scale: float = 1.0) -> float:
    """beta * log of integral_0^1 exp(f(t)/beta) dt by mpmath quadrature (normal transforms: over x = Phi^-1(t))."""
    beta = mpmath.mpf(beta)
    if transform in ("normal_icdf", "scaled_normal_icdf"):
        peak = scale / beta  # the integrand exp(scale*x/beta) * phi(x) peaks at x = scale/beta
        integrand = lambda x: mpmath.exp(scale * x / beta - x**2 / 2) / mpmath.sqrt(2 * mpmath.pi)  # noqa: E731
        integral = mpmath.quad(integrand, [-mpmath.inf, peak - 10, peak, peak + 10, mpmath.inf])
    else:
        f = {"identity": lambda t: t, "log": mpmath.log, "square": lambda t: t**2, "sqrt": mpmath.sqrt}[transform]
        # The integrand is concentrated within a few beta of t = 1
        points = sorted({mpmath.mpf(0), *(mpmath.mpf(1) - k * beta for k in (200, 50, 10, 2) if k * beta < 1), mpmath.mpf(1)})
        integral = mpmath.quad(lambda t: mpmath.exp(f(t) / beta), points)
    return float(beta * mpmath.log(integral))


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("transform", [t for t in TRANSFORMS if t != "scaled_normal_icdf"])
def test_exact_partition_matches_quadrature(transform, beta):
    assert beta_log_partition(transform, beta) == pytest.approx(quadrature_beta_log_z(transform, beta), rel=1e-9, abs=1e-10)


@pytest.mark.parametrize("beta", BETAS)
def test_scaled_normal_icdf_partition_matches_quadrature(beta):
    scales = np.array([0.3, 1.0, 1.7])
    expected = [quadrature_beta_log_z("scaled_normal_icdf", beta, scale=float(s)) for s in scales]
    np.testing.assert_allclose(beta_log_partition("scaled_normal_icdf", beta, scale=scales), expected, rtol=1e-9)


def test_check_values_from_the_design_notes():
    assert beta_log_partition("identity", 0.003) / 0.003 == pytest.approx(327.524, abs=5e-4)
    assert beta_log_partition("identity", 0.1) / 0.1 == pytest.approx(7.69737, abs=5e-6)
    assert beta_log_partition("identity", 0.5) / 0.5 == pytest.approx(1.16144, abs=5e-6)
    assert beta_log_partition("identity", 1.0) == pytest.approx(0.541325, abs=5e-7)
    assert math.exp(beta_log_partition("log", 0.1) / 0.1) == pytest.approx(0.0909, abs=5e-5)
    assert math.exp(beta_log_partition("log", 1.0)) == pytest.approx(0.5)
    # The README's approximation drops beta*log(1 - exp(-1/beta)): 0.145 nats of log Z at beta=0.5, 0.459 at beta=1
    assert (beta_log_partition("identity", 0.5, "approx") - beta_log_partition("identity", 0.5)) / 0.5 == pytest.approx(0.145, abs=1e-3)
    assert beta_log_partition("identity", 1.0, "approx") - beta_log_partition("identity", 1.0) == pytest.approx(0.459, abs=1e-3)
    assert beta_log_partition("identity", 0.01, "approx") == pytest.approx(beta_log_partition("identity", 0.01), abs=1e-15)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_no_overflow_at_tiny_beta(transform):
    value = beta_log_partition(transform, 1e-4, scale=np.array([0.5, 2.0]))
    assert np.all(np.isfinite(value))
    value = beta_log_partition(transform, 1e-4, "finite_n", n=np.array([3, 50]), scale=np.array([0.5, 2.0]))
    assert np.all(np.isfinite(value))


def test_finite_n_values_from_the_design_notes():
    expected = {1: 0.9931, 3: 0.9862, 10: 0.9760, 50: 0.9621}
    values = beta_log_partition("identity", 0.01, "finite_n", n=np.array(list(expected)))
    # Four-decimal figures; n=3 is 0.98614 (the notes round it up to 0.9862)
    np.testing.assert_allclose(values, list(expected.values()), atol=1e-4)
    assert beta_log_partition("identity", 0.01) == pytest.approx(0.9539, abs=5e-5)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("beta", [0.01, 0.5, 2.0])
def test_finite_n_matches_direct_sum(transform, beta):
    counts = np.array([3, 4, 10, 3])
    scales = np.array([0.5, 1.0, 1.5, 2.0])

    def direct(n, scale):
        def f(t):
            lo = mpmath.mpf(1) / n
            if transform == "identity":
                return t
            if transform == "log":
                return mpmath.log(max(t, lo))
            if transform == "square":
                return t**2
            if transform == "sqrt":
                return mpmath.sqrt(t)
            value = -mpmath.sqrt(2) * mpmath.erfinv(1 - 2 * min(max(t, lo), 1 - lo))  # Phi^-1
            return value * (scale if transform == "scaled_normal_icdf" else 1)

        terms = [mpmath.exp(f(mpmath.mpf(k) / n) / beta) for k in range(n + 1)]
        return float(beta * mpmath.log(mpmath.fsum(terms) / (n + 1)))

    values = beta_log_partition(transform, beta, "finite_n", n=counts, scale=scales)
    np.testing.assert_allclose(values, [direct(int(n), s) for n, s in zip(counts, scales)], rtol=1e-10, atol=1e-12)


def test_finite_n_converges_to_exact():
    for transform in ("identity", "square", "sqrt"):
        assert beta_log_partition(transform, 0.5, "finite_n", n=200000) == pytest.approx(
            beta_log_partition(transform, 0.5), abs=1e-4
        )


def test_quantiles_ties_and_ragged_references():
    refs = pad_ragged([[0, 0, 1], [0, 0, 1], [0, 0, 0], [3.0, 1.0], [2.0]])
    rewards = np.array([0.0, 1.0, 0.0, 2.0, 1.0])
    np.testing.assert_allclose(quantile_rewards(rewards, refs, "le"), [2 / 3, 1, 1, 1 / 2, 0])
    np.testing.assert_allclose(quantile_rewards(rewards, refs, "mid"), [1 / 3, 5 / 6, 1 / 2, 1 / 2, 0])
    # With continuous rewards (no ties) both conventions agree
    rng = np.random.default_rng(0)
    refs, rewards = rng.normal(size=(50, 7)), rng.normal(size=50)
    np.testing.assert_array_equal(quantile_rewards(rewards, refs, "le"), quantile_rewards(rewards, refs, "mid"))


def test_transform_clamping():
    q = np.array([0.0, 0.5, 1.0])
    np.testing.assert_allclose(transform_quantiles(q, "log", n=4), [math.log(0.25), math.log(0.5), 0.0])
    from scipy.stats import norm

    np.testing.assert_allclose(transform_quantiles(q, "normal_icdf", n=4), [norm.ppf(0.25), 0.0, norm.ppf(0.75)])
    np.testing.assert_allclose(transform_quantiles(q, "scaled_normal_icdf", n=4, scale=2.0), 2 * norm.ppf([0.25, 0.5, 0.75]))
    np.testing.assert_allclose(reference_stds(pad_ragged([[1.0, 3.0], [0.0, 1.0, 2.0]])), [math.sqrt(2), 1.0])


def official_qrpo_loss(beta, logps, ref_logps, rewards, ref_rewards):
    """The reference loss of the official QRPO README (seeds/qrpo_official_readme.txt), verbatim."""
    log_ratios = logps - ref_logps
    quantile_rewards = (ref_rewards <= rewards.unsqueeze(dim=1)).float().mean(dim=1)
    log_Z = torch.log(beta) + 1 / beta  # numerical simplification (Eq. 11)
    loss = (quantile_rewards - beta * log_Z - beta * log_ratios) ** 2
    return loss


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.7])
def test_approx_partition_reproduces_official_loss(beta):
    generator = torch.Generator().manual_seed(0)
    logps, ref_logps = -50 * torch.rand(64, generator=generator, dtype=torch.float64), -50 * torch.rand(64, generator=generator, dtype=torch.float64)
    rewards, ref_rewards = torch.randn(64, generator=generator, dtype=torch.float64), torch.randn(64, 20, generator=generator, dtype=torch.float64)
    expected = official_qrpo_loss(torch.tensor(beta, dtype=torch.float64), logps, ref_logps, rewards, ref_rewards)
    q = quantile_rewards(rewards.numpy(), ref_rewards.numpy(), "le")
    target = transform_quantiles(q, "identity") - beta_log_partition("identity", beta, "approx")
    ours = (torch.from_numpy(target) - beta * (logps - ref_logps)) ** 2
    # The official code casts the quantile to float32
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


def test_rpo_value_matches_direct_float64():
    rng = np.random.default_rng(0)
    groups = np.array([0, 0, 1, 1, 1, 2])
    rewards = rng.normal(size=6)
    ref_logps = rng.uniform(-6, -1, size=6)
    for tau in (0.1, 1.0, 5.0):
        values = rpo_values(groups, rewards, ref_logps, tau, "ref_weighted", completions=np.arange(6))
        np.testing.assert_array_equal(values, rpo_values(groups, rewards, ref_logps, tau, "ref_weighted_rows"))
        direct = {g: tau * np.log(np.sum(np.exp(ref_logps[groups == g]) * np.exp(rewards[groups == g] / tau))) for g in range(3)}
        np.testing.assert_allclose(values, [direct[g] for g in groups], rtol=1e-12)
        mc = rpo_values(groups, rewards, ref_logps, tau, "monte_carlo")
        direct = {g: tau * np.log(np.mean(np.exp(rewards[groups == g] / tau))) for g in range(3)}
        np.testing.assert_allclose(mc, [direct[g] for g in groups], rtol=1e-12)


def test_monte_carlo_value_over_reference_rewards():
    rng = np.random.default_rng(1)
    references = [rng.normal(size=5), rng.normal(size=2), rng.normal(size=7)]
    for tau in (0.05, 1.0):
        values = monte_carlo_values(pad_ragged(references), tau)
        direct = [float(tau * mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(r) / tau) for r in refs) / len(refs))) for refs in references]
        np.testing.assert_allclose(values, direct, rtol=1e-13)
        # Each row's references are its prompt's rows: the same value as over the rows
        groups = np.repeat(np.arange(3), [len(refs) for refs in references])
        rows = np.concatenate(references)
        np.testing.assert_allclose(
            monte_carlo_values(pad_ragged([references[g] for g in groups]), tau),
            rpo_values(groups, rows, None, tau, "monte_carlo"), rtol=1e-13,
        )
    with pytest.raises(ValueError, match="tau"):
        monte_carlo_values(pad_ragged(references), 0.0)


def test_rpo_value_is_finite_for_sequence_log_probs():
    groups = np.array([0, 0, 0, 1])
    rewards = np.array([0.5, -1.0, 2.0, 0.0])
    ref_logps = np.array([-1000.0, -1012.5, -998.0, -1100.0])
    tau = 0.5
    # The direct sum of probabilities underflows to 0 in float64 (and float32)
    assert np.sum(np.exp(ref_logps[:3]) * np.exp(rewards[:3] / tau)) == 0.0
    values = rpo_values(groups, rewards, ref_logps, tau, completions=np.arange(4))
    assert np.all(np.isfinite(values))
    exact = [
        float(tau * mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(lp) + mpmath.mpf(r) / tau) for lp, r in zip(ref_logps[:3], rewards[:3])))),
        float(tau * (mpmath.mpf(-1100.0) + 0.0)),
    ]
    np.testing.assert_allclose(values, [exact[0]] * 3 + [exact[1]], rtol=1e-13)
    # At the optimum the policy puts probability exp(logp_ref + (r - V)/tau) on each completion: a softmax that sums to 1
    log_probs = ref_logps[:3] + (rewards[:3] - values[:3]) / tau
    assert np.exp(log_probs).sum() == pytest.approx(1.0, rel=1e-12)


def test_rpo_value_counts_each_distinct_completion_once():
    # Prompt 0: completion a twice (rewards 0 and 1), b once; prompt 1: c three times; prompt 2: d and e
    groups = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    completions = np.array([0, 1, 0, 2, 2, 2, 3, 4])
    rewards = np.array([0.0, 2.0, 1.0, -1.0, -1.0, -1.0, 0.3, 0.7])
    ref_logps = np.array([-3.0, -5.0, -3.0 + 1e-9, -2.0, -2.0, -2.0, -4.0, -6.0])
    np.testing.assert_allclose(label_means(completions, rewards), [0.5, 2.0, 0.5, -1.0, -1.0, -1.0, 0.3, 0.7])
    for tau in (0.1, 1.0):
        values = rpo_values(groups, rewards, ref_logps, tau, "ref_weighted", completions=completions)
        # Direct float64 sum over the distinct completions, each with its mean reward and mean reference log-prob
        distinct = {}
        for g, c, r, lp in zip(groups, completions, rewards, ref_logps):
            distinct.setdefault((g, c), []).append((r, lp))
        direct = {g: 0.0 for g in range(3)}
        for (g, _), terms in distinct.items():
            r, lp = np.mean(terms, axis=0)
            direct[g] += np.exp(lp) * np.exp(r / tau)
        np.testing.assert_allclose(values, [tau * np.log(direct[g]) for g in groups], rtol=1e-12)
        # At the optimum the distinct completions' probabilities sum to 1; counting rows gives less
        first = np.unique(completions, return_index=True)[1]
        optimum = np.exp(ref_logps + (label_means(completions, rewards) - values) / tau)[first]
        np.testing.assert_allclose(np.bincount(groups[first], weights=optimum), 1.0, rtol=1e-9)
        rows = rpo_values(groups, rewards, ref_logps, tau, "ref_weighted_rows")
        assert np.all(rows[:6] > values[:6])  # prompts with a duplicate: the row sum counts it twice
        # Monte Carlo: every row is a draw from the reference and counts
        mc = rpo_values(groups, rewards, ref_logps, tau, "monte_carlo", completions=completions)
        np.testing.assert_allclose(mc[3], tau * np.log(np.mean(np.exp(rewards[3:6] / tau))), rtol=1e-12)


def test_own_reward_index_prefers_the_equal_reference():
    assert own_reward_index(np.array([0.5000001, 0.5, 0.2, 0.9]), 0.5) == 1
    assert own_reward_index(np.array([0.2, 0.50000004, 0.5000001, 0.9]), 0.5) == 1  # nearest within tolerance
    assert own_reward_index(np.array([0.2, 0.9]), 0.5) is None
    q = quantile_rewards(np.array([0.5]), np.delete([0.5000001, 0.5, 0.2, 0.9], 1)[None, :])
    assert q[0] == pytest.approx(1 / 3)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="beta must be > 0"):
        beta_log_partition("identity", 0.0)
    with pytest.raises(ValueError, match="only holds for `transform='identity'`"):
        beta_log_partition("log", 0.1, "approx")
    with pytest.raises(ValueError, match="needs the number of references"):
        beta_log_partition("identity", 0.1, "finite_n")
    with pytest.raises(ValueError, match="Unknown transform"):
        beta_log_partition("cube", 0.1)

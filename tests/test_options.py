"""The options that users of the official QRPO code and of the Apertus trainer rely on, checked against exact numbers."""

import math

import mpmath
import numpy as np
import pytest
import torch
from conftest import assert_loss_logged, logged, make_args, pointwise_rows, sequence_logps
from datasets import Dataset
from transformers import AutoModelForCausalLM

from qrpo_trl import QRPOConfig, QRPOTrainer, RPOConfig, RPOTrainer
from qrpo_trl.data_utils import to_pointwise
from qrpo_trl.targets import beta_log_partition


mpmath.mp.dps = 40
METHODS = pytest.mark.parametrize(
    "trainer_class, config_class", [(QRPOTrainer, QRPOConfig), (RPOTrainer, RPOConfig)], ids=["qrpo", "rpo"]
)


def paired_rows(num_pairs=6, seed=0):
    """Paired text rows with rewards and reference rewards."""
    rng = np.random.default_rng(seed)
    prompts = ["what is the sky", "tell me about the sea", "hello"]
    answers = [" blue", " green grass", " yes it is good", " no", " maybe red", " sure"]
    return {
        "prompt": [prompts[i % 3] for i in range(num_pairs)],
        "chosen": [answers[i % 6] for i in range(num_pairs)],
        "rejected": [answers[(i + 3) % 6] for i in range(num_pairs)],
        "chosen_reward": rng.normal(size=num_pairs).round(3).tolist(),
        "rejected_reward": rng.normal(size=num_pairs).round(3).tolist(),
        "ref_rewards": rng.normal(size=(num_pairs, 5)).round(3).tolist(),
    }


def first_loss(trainer):
    trainer.train()
    return logged(trainer)[0]


# ---------------------------------------------------------------------------------------------------------------------
# regression_loss


@METHODS
@pytest.mark.parametrize("regression_loss", ["mse", "mae"])
def test_regression_loss_at_the_reference(tiny_llama_path, tmp_path, trainer_class, config_class, regression_loss):
    """With the policy at the reference (lr 0) and one batch holding the dataset, the loss is the penalty of the target."""
    dataset = Dataset.from_dict(pointwise_rows())
    args = make_args(
        config_class, tmp_path, beta=0.4, regression_loss=regression_loss, learning_rate=0.0,
        per_device_train_batch_size=len(dataset), max_steps=1,
    )
    trainer = trainer_class(model=tiny_llama_path, args=args, train_dataset=dataset)
    target = np.array(trainer.train_dataset["target"])
    expected = np.mean(target**2) if regression_loss == "mse" else np.mean(np.abs(target))
    if trainer_class is RPOTrainer:  # 0.5 * penalty((r - V) / beta)
        expected *= 0.5 / 0.4 ** (2 if regression_loss == "mse" else 1)
    assert first_loss(trainer) == pytest.approx(expected, rel=1e-5)
    assert logged(trainer, "residual")[0] == pytest.approx(np.mean(np.abs(target)), rel=1e-5)


def test_regression_loss_is_checked(tmp_path):
    with pytest.raises(ValueError, match="Unknown `regression_loss` 'huber'"):
        make_args(QRPOConfig, tmp_path, regression_loss="huber")


# ---------------------------------------------------------------------------------------------------------------------
# paired_samples


def test_paired_samples_select_completions():
    paired = Dataset.from_dict(paired_rows())
    both = to_pointwise(paired, "train", {})
    assert both["completion"] == [c for pair in zip(paired["chosen"], paired["rejected"]) for c in pair]
    assert both["pair_index"] == [i for i in range(6) for _ in range(2)] and both["is_chosen"] == [1, 0] * 6
    chosen = to_pointwise(paired, "train", {}, "chosen")
    assert chosen["completion"] == paired["chosen"] and chosen["reward"] == paired["chosen_reward"]
    rejected = to_pointwise(paired, "train", {}, "rejected")
    assert rejected["completion"] == paired["rejected"] and rejected["reward"] == paired["rejected_reward"]

    big = Dataset.from_dict(paired_rows(num_pairs=200))
    draws = [to_pointwise(big, "train", {}, "random", seed) for seed in (0, 0, 1)]
    assert draws[0]["is_chosen"] == draws[1]["is_chosen"] != draws[2]["is_chosen"]  # seeded
    flags = np.array(draws[0]["is_chosen"])
    assert len(flags) == 200 and 60 < flags.sum() < 140  # one completion per pair, either one
    expected = [c if f else r for c, r, f in zip(big["chosen"], big["rejected"], flags)]
    assert draws[0]["completion"] == expected
    assert draws[0]["reward"] == [c if f else r for c, r, f in zip(big["chosen_reward"], big["rejected_reward"], flags)]
    # Independent of how the map is batched
    assert to_pointwise(big, "train", {"batch_size": 7}, "random", 0)["is_chosen"] == draws[0]["is_chosen"]


@METHODS
def test_paired_samples_in_the_trainer(tiny_llama_path, tmp_path, trainer_class, config_class):
    paired = Dataset.from_dict(paired_rows())
    args = make_args(config_class, tmp_path, paired_samples="chosen", eval_strategy="steps", eval_steps=3)
    trainer = trainer_class(model=tiny_llama_path, args=args, train_dataset=paired, eval_dataset=paired)
    assert trainer.train_dataset["completion"] == paired["chosen"]
    assert len(trainer.eval_dataset) == 12  # evaluation keeps both completions
    trainer.train()
    assert_loss_logged(trainer)


def test_paired_samples_on_a_pointwise_dataset_is_an_error(tiny_llama_path, tmp_path):
    args = make_args(QRPOConfig, tmp_path, paired_samples="random")
    with pytest.raises(ValueError, match="paired_samples='random' selects completions of pairs, but the train dataset"):
        QRPOTrainer(model=tiny_llama_path, args=args, train_dataset=Dataset.from_dict(pointwise_rows()))


# ---------------------------------------------------------------------------------------------------------------------
# normalize_beta_by_length


def mp_exact_beta_log_partition(transform, beta):
    """beta * log Z from the closed forms of Z, in 40-digit arithmetic (the exponentials do not overflow there)."""
    beta = mpmath.mpf(beta)
    z = {
        "identity": lambda: beta * mpmath.expm1(1 / beta),
        "log": lambda: beta / (1 + beta),
        "square": lambda: mpmath.sqrt(mpmath.pi * beta) / 2 * mpmath.erfi(1 / mpmath.sqrt(beta)),
        "sqrt": lambda: 2 * beta * (beta + (1 - beta) * mpmath.exp(1 / beta)),
        "normal_icdf": lambda: mpmath.exp(1 / (2 * beta**2)),
    }[transform]()
    return float(beta * mpmath.log(z))


@pytest.mark.parametrize("transform", ["identity", "log", "square", "sqrt", "normal_icdf"])
def test_beta_log_partition_per_row_down_to_1e_7(transform):
    betas = np.array([1e-7, 3e-6, 1e-3, 0.05, 0.5, 2.0])
    values = beta_log_partition(transform, betas)
    assert values.shape == betas.shape and np.all(np.isfinite(values))
    np.testing.assert_allclose(values, [mp_exact_beta_log_partition(transform, b) for b in betas], rtol=1e-12)
    # The finite-n partition, per row, against the direct sum 1/(n+1) sum_k exp(f(k/n) / beta)
    n = np.array([3, 3, 10, 4, 3, 20])
    finite = beta_log_partition(transform, betas, "finite_n", n=n)

    def direct(beta, count):
        beta = mpmath.mpf(beta)
        grid = [mpmath.mpf(k) / count for k in range(count + 1)]
        lo = mpmath.mpf(1) / count
        f = {
            "identity": lambda t: t,
            "log": lambda t: mpmath.log(max(t, lo)),
            "square": lambda t: t**2,
            "sqrt": mpmath.sqrt,
            "normal_icdf": lambda t: -mpmath.sqrt(2) * mpmath.erfinv(1 - 2 * min(max(t, lo), 1 - lo)),
        }[transform]
        return float(beta * mpmath.log(mpmath.fsum(mpmath.exp(f(t) / beta) for t in grid) / (count + 1)))

    np.testing.assert_allclose(finite, [direct(b, c) for b, c in zip(betas, n)], rtol=1e-10)


def test_normalize_beta_by_length_targets_and_loss(tiny_llama_path, tmp_path):
    """beta_i = beta / L_i in the target f(q) - beta_i log Z(beta_i) and in the regression, with given ref log-probs."""
    rows = pointwise_rows()
    dataset = Dataset.from_dict(rows)
    beta = 2.0
    args = make_args(
        QRPOConfig, tmp_path, beta=beta, normalize_beta_by_length=True, learning_rate=0.0,
        per_device_train_batch_size=len(dataset), max_steps=1,
    )
    prepared = QRPOTrainer(model=tiny_llama_path, args=args, train_dataset=dataset).train_dataset
    lengths = np.array([len(ids) for ids in prepared["completion_ids"]])  # EOS included
    np.testing.assert_allclose(prepared["beta"], beta / lengths, rtol=1e-15)
    q = (np.array(rows["ref_rewards"]) <= np.array(rows["reward"])[:, None]).mean(axis=1)
    log_partition = [mp_exact_beta_log_partition("identity", beta / length) for length in lengths]
    np.testing.assert_allclose(prepared["target"], q - log_partition, rtol=1e-12)
    np.testing.assert_allclose(prepared["beta_log_partition"], log_partition, rtol=1e-12)

    # Given reference log-probs offset by delta make the log-ratio delta at step 1: the loss weighs it by beta_i
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    ref_logps = np.array([sequence_logps(reference, r["prompt_ids"], r["completion_ids"]) for r in prepared])
    delta = np.linspace(-3.0, 3.0, len(dataset))
    given = Dataset.from_dict({**rows, "ref_logps": (ref_logps - delta).tolist()})
    trainer = QRPOTrainer(model=tiny_llama_path, args=args, train_dataset=given)
    expected = np.mean((np.array(prepared["target"]) - beta / lengths * delta) ** 2)
    assert first_loss(trainer) == pytest.approx(expected, rel=1e-4)


def test_normalize_beta_by_length_counts_the_trained_tokens(tiny_llama_path, tmp_path):
    rows = {"prompt": ["hello"] * 2, "completion": [" yes it is good", " no"], "reward": [1.0, 0.0]}
    rows["ref_rewards"] = [[0.0, 0.5, 2.0]] * 2
    args = make_args(QRPOConfig, tmp_path, beta=1.0, normalize_beta_by_length=True, max_length=4)
    prepared = QRPOTrainer(model=tiny_llama_path, args=args, train_dataset=Dataset.from_dict(rows)).train_dataset
    # "<s> hello" is 2 tokens: 2 of the 5 completion tokens are trained in the first row, both of " no </s>" in the second
    np.testing.assert_allclose(prepared["beta"], [1 / 2, 1 / 2])


def test_normalize_beta_by_length_with_mean_log_probs_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="already divides by the completion length"):
        make_args(QRPOConfig, tmp_path, normalize_beta_by_length=True, logps_normalization="mean")


# ---------------------------------------------------------------------------------------------------------------------
# Reference log-probabilities given with the data


def refuse_forward(model):
    """Make any forward of `model` raise (a pre-hook on its embeddings, which every forward path runs)."""

    def refuse(*_):
        raise AssertionError("the reference model was run")

    model.get_input_embeddings().register_forward_pre_hook(refuse)
    return model


@METHODS
@pytest.mark.parametrize("precompute", [True, False], ids=["precompute", "on_the_fly"])
def test_given_reference_logps_are_used_as_they_are(tiny_llama_path, tmp_path, trainer_class, config_class, precompute):
    rows = paired_rows()
    rng = np.random.default_rng(3)
    rows["ref_chosen_logps"] = rng.uniform(-30, -5, size=6).tolist()
    rows["ref_rejected_logps"] = rng.uniform(-30, -5, size=6).tolist()
    ref_model = refuse_forward(AutoModelForCausalLM.from_pretrained(tiny_llama_path))
    args = make_args(
        config_class, tmp_path, beta=0.5, precompute_ref_log_probs=precompute, learning_rate=0.0,
        per_device_train_batch_size=12, max_steps=1,
    )
    trainer = trainer_class(model=tiny_llama_path, ref_model=ref_model, args=args, train_dataset=Dataset.from_dict(rows))
    prepared = trainer.train_dataset
    given = [logp for pair in zip(rows["ref_chosen_logps"], rows["ref_rejected_logps"]) for logp in pair]
    assert prepared["ref_logps"] == given  # exactly, as float64
    policy = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    logps = np.array([sequence_logps(policy, r["prompt_ids"], r["completion_ids"]) for r in prepared])
    residuals = np.array(prepared["target"]) - 0.5 * (logps - np.array(given))
    scale = 0.5 / 0.5**2 if trainer_class is RPOTrainer else 1.0
    assert first_loss(trainer) == pytest.approx(scale * np.mean(residuals**2), rel=1e-5)
    if trainer_class is RPOTrainer:  # the value V(x) is built from the given log-probs too
        # One term per distinct completion of the prompt (the pairs repeat completions), the mean over its rows
        scores = np.array(given) + np.array(prepared["reward"]) / 0.5
        keys = list(zip(prepared["prompt"], prepared["completion"]))
        terms = {key: np.mean([s for k, s in zip(keys, scores) if k == key]) for key in keys}
        values = [0.5 * np.log(sum(np.exp(t) for (p, _), t in terms.items() if p == prompt)) for prompt, _ in keys]
        np.testing.assert_allclose(prepared["value"], values, rtol=1e-12)


def test_given_reference_logps_are_checked(tiny_llama_path, tmp_path):
    rows = paired_rows()
    rows["ref_chosen_logps"] = [-3.0] * 6
    args = make_args(QRPOConfig, tmp_path)
    with pytest.raises(ValueError, match="has 'ref_chosen_logps' but not 'ref_rejected_logps'"):
        QRPOTrainer(model=tiny_llama_path, args=args, train_dataset=Dataset.from_dict(rows))
    rows["ref_rejected_logps"] = [-3.0, -2.0, float("nan"), -1.0, -1.0, -1.0]
    with pytest.raises(ValueError, match=r"Column 'ref_rejected_logps' of the train dataset, row 2: expected a finite"):
        QRPOTrainer(model=tiny_llama_path, args=args, train_dataset=Dataset.from_dict(rows))
    del rows["ref_chosen_logps"], rows["ref_rejected_logps"]
    rows["ref_logps"] = [-1.0] * 6
    with pytest.raises(ValueError, match="is paired and has a single 'ref_logps' column"):
        QRPOTrainer(model=tiny_llama_path, args=args, train_dataset=Dataset.from_dict(rows))
    pointwise = pointwise_rows()
    pointwise["ref_logps"] = [-1.0] * 11 + [float("inf")]
    with pytest.raises(ValueError, match=r"Column 'ref_logps' of the train dataset, row 11: expected a finite"):
        QRPOTrainer(model=tiny_llama_path, args=args, train_dataset=Dataset.from_dict(pointwise))


# ---------------------------------------------------------------------------------------------------------------------
# Log-probabilities at the sampling temperature


@torch.no_grad()
def tempered_logps(model, prompt_ids, completion_ids, temperature) -> float:
    input_ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    log_probs = (model(input_ids=input_ids).logits[0].double() / temperature).log_softmax(-1)
    start = len(prompt_ids) - 1
    return sum(log_probs[start + i, token].item() for i, token in enumerate(completion_ids))


@pytest.mark.parametrize("precompute", [True, False], ids=["precompute", "on_the_fly"])
def test_apply_temperature_in_training(tiny_llama_path, tmp_path, precompute):
    dataset = Dataset.from_dict(pointwise_rows())
    temperature = 0.7
    args = make_args(
        QRPOConfig, tmp_path, temperature=temperature, apply_temperature_in_training=True, learning_rate=0.0,
        per_device_train_batch_size=len(dataset), max_steps=1, precompute_ref_log_probs=precompute,
    )
    trainer = QRPOTrainer(model=tiny_llama_path, args=args, train_dataset=dataset)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    prepared = trainer.train_dataset
    expected = [tempered_logps(model, r["prompt_ids"], r["completion_ids"], temperature) for r in prepared]
    untempered = [sequence_logps(model, r["prompt_ids"], r["completion_ids"]) for r in prepared]
    assert not np.allclose(expected, untempered, rtol=1e-3)
    if precompute:
        np.testing.assert_allclose(prepared["ref_logps"], expected, rtol=1e-5)
    trainer.train()
    np.testing.assert_allclose(logged(trainer, "logps/policy")[0], np.mean(expected), rtol=1e-5)
    np.testing.assert_allclose(logged(trainer, "logps/ref")[0], np.mean(expected), rtol=1e-5)


def test_apply_temperature_in_training_encoder_decoder(tiny_t5_path, tmp_path):
    dataset = Dataset.from_dict(pointwise_rows())
    args = make_args(QRPOConfig, tmp_path, temperature=1.5, apply_temperature_in_training=True)
    trainer = QRPOTrainer(model=tiny_t5_path, args=args, train_dataset=dataset)
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_path, dropout_rate=0.0)
    expected = []
    with torch.no_grad():
        for row in trainer.train_dataset:
            labels = torch.tensor([row["completion_ids"]])
            logits = model(input_ids=torch.tensor([row["prompt_ids"]]), labels=labels).logits[0].double() / 1.5
            expected.append(logits.log_softmax(-1).gather(-1, labels[0].unsqueeze(-1)).sum().item())
    np.testing.assert_allclose(trainer.train_dataset["ref_logps"], expected, rtol=1e-5)
    assert math.isfinite(first_loss(trainer))


# ---------------------------------------------------------------------------------------------------------------------
# Smaller fixes


def test_scaled_normal_icdf_normalises_by_the_mean_over_training_rows(tiny_llama_path, tmp_path):
    """As the official code: sigma_x / mean over rows of the per-row std, so a prompt with more rows weighs more."""
    refs_a, refs_b = [0.0, 1.0, 2.0, 4.0], [0.0, 3.0, 6.0, 7.0]
    rows = {"prompt": ["hello"] * 3 + ["yo"], "completion": [" yes", " no", " maybe", " sure"]}
    rows["reward"] = [0.5, 1.5, 3.0, 6.5]
    rows["ref_rewards"] = [refs_a] * 3 + [refs_b]
    beta = 0.5
    args = make_args(QRPOConfig, tmp_path, beta=beta, transform="scaled_normal_icdf")
    prepared = QRPOTrainer(model=tiny_llama_path, args=args, train_dataset=Dataset.from_dict(rows)).train_dataset
    stds = np.array([np.std(refs_a, ddof=1)] * 3 + [np.std(refs_b, ddof=1)])
    sigma = stds / stds.mean()
    q = np.array([1, 2, 3, 3]) / 4
    from scipy.stats import norm

    np.testing.assert_allclose(prepared["target"], sigma * norm.ppf(q) - sigma**2 / (2 * beta), rtol=1e-12)


def test_encoder_decoder_truncation_keeps_the_eos(tiny_t5_path, t5_tokenizer, tmp_path):
    rows = {"prompt": ["hello"], "completion": [" yes it is good"], "reward": [1.0], "ref_rewards": [[0.0, 2.0]]}
    args = make_args(QRPOConfig, tmp_path, max_length=4)
    trainer = QRPOTrainer(model=tiny_t5_path, args=args, train_dataset=Dataset.from_dict(rows))
    row = trainer.train_dataset[0]
    assert len(row["prompt_ids"]) == 2 and row["completion_ids"][-1] == t5_tokenizer.eos_token_id
    batch = trainer.data_collator([row])
    # 2 prompt tokens leave 2 of the 5 completion tokens: the first one, then EOS
    assert batch["labels"].tolist() == [[row["completion_ids"][0], t5_tokenizer.eos_token_id]]


# ---------------------------------------------------------------------------------------------------------------------
# Metrics


@METHODS
def test_pair_metrics_on_a_paired_eval_dataset(tiny_llama_path, tmp_path, trainer_class, config_class):
    """DPOTrainer's rewards/* over the pairs of the whole eval set, although batches of 5 split pairs."""
    paired = Dataset.from_dict(paired_rows())
    beta = 0.5
    args = make_args(config_class, tmp_path, beta=beta, learning_rate=0.0, per_device_eval_batch_size=5, max_steps=1)
    trainer = trainer_class(model=tiny_llama_path, args=args, train_dataset=paired, eval_dataset=paired)
    rng = np.random.default_rng(0)
    shift = rng.normal(size=len(trainer.eval_dataset))  # given reference log-probs make the implicit rewards differ
    eval_dataset = trainer.eval_dataset.remove_columns("ref_logps").add_column(
        "ref_logps", (np.array(trainer.eval_dataset["ref_logps"]) - shift).tolist()
    )
    metrics = trainer.evaluate(eval_dataset)
    implicit = beta * shift  # the policy is the reference: log-ratio = shift
    chosen, rejected = implicit[0::2], implicit[1::2]
    assert metrics["eval_rewards/chosen"] == pytest.approx(chosen.mean(), rel=1e-5, abs=1e-6)
    assert metrics["eval_rewards/rejected"] == pytest.approx(rejected.mean(), rel=1e-5, abs=1e-6)
    assert metrics["eval_rewards/margins"] == pytest.approx((chosen - rejected).mean(), rel=1e-5, abs=1e-6)
    assert metrics["eval_rewards/accuracies"] == pytest.approx((chosen > rejected).mean())
    assert math.isfinite(metrics["eval_residual"])
    if trainer_class is QRPOTrainer:
        assert metrics["eval_beta_log_partition"] == pytest.approx(beta_log_partition("identity", beta))
    # A pointwise eval dataset has no pairs
    assert "eval_rewards/chosen" not in trainer.evaluate(Dataset.from_dict(pointwise_rows()))

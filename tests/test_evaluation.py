"""The sample-quality metric ranks real digits above an untrained model's samples and above noise."""
import dataclasses

import jax
import numpy as np
import pytest

from unet_flax import evaluation
from unet_flax.config import PRESETS, SamplingConfig
from unet_flax.sampling import sample
from unet_flax.train_step import create_train_state


@pytest.fixture(scope="module")
def measured():
    classifier = evaluation.classifier_params(16)  # trained on first use, then cached
    train, held_out = evaluation.digits_split(16)
    held, held_predictions = evaluation.features_and_predictions(classifier, held_out.images)
    real, _ = evaluation.features_and_predictions(classifier, train.images)

    config = dataclasses.replace(PRESETS["digits"], model=dataclasses.replace(PRESETS["digits"].model, num_classes=10))
    untrained = create_train_state(config, jax.random.PRNGKey(0)).params
    generated = sample(untrained, config, SamplingConfig(num_samples=200, labels=tuple(range(10)), sampling_steps=10,
                                                         guidance_scale=2.0, batch_size=200)).images
    noise = np.random.default_rng(0).integers(0, 256, (200, 16, 16, 1), dtype=np.uint8)
    return {
        "accuracy": float(np.mean(held_predictions == held_out.labels)),
        "real": evaluation.frechet_distance(real, held),
        "untrained": evaluation.frechet_distance(evaluation.features_and_predictions(classifier, generated)[0], held),
        "noise": evaluation.frechet_distance(evaluation.features_and_predictions(classifier, noise)[0], held),
    }


def test_classifier_reads_held_out_digits(measured):
    assert measured["accuracy"] >= 0.95


def test_real_digits_rank_first(measured):
    assert measured["real"] < measured["untrained"] / 5
    assert measured["real"] < measured["noise"] / 5


def test_frechet_distance_is_zero_for_the_same_set_and_grows_with_a_shift():
    features = np.random.default_rng(0).standard_normal((500, 8))
    assert evaluation.frechet_distance(features, features) == pytest.approx(0, abs=1e-6)
    # Shifting the mean by 1 in every dimension adds exactly 8.
    assert evaluation.frechet_distance(features, features + 1) == pytest.approx(8, rel=1e-6)


def with_moments(mean: np.ndarray, covariance: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` points whose sample mean and sample covariance are exactly `mean` and `covariance`."""
    x = np.random.default_rng(seed).standard_normal((count, len(mean)))
    x -= x.mean(0)
    x = x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T  # sample covariance: identity
    return x @ np.linalg.cholesky(covariance).T + mean


def test_frechet_distance_with_unequal_covariances_matches_the_closed_form():
    """2-D Gaussians whose covariances do not commute. For 2x2 matrices with non-negative eigenvalues,
    Tr(M^(1/2)) = sqrt(Tr M + 2 sqrt(det M)), which gives the distance without any matrix square root."""
    mean_a, mean_b = np.array([0.5, -1.0]), np.array([2.0, 0.25])
    cov_a, cov_b = np.array([[2.0, 0.9], [0.9, 1.0]]), np.array([[0.5, -0.3], [-0.3, 3.0]])
    product = cov_a @ cov_b
    trace_root = np.sqrt(np.trace(product) + 2 * np.sqrt(np.linalg.det(product)))
    expected = np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root
    a, b = with_moments(mean_a, cov_a, 400, seed=1), with_moments(mean_b, cov_b, 300, seed=2)
    assert evaluation.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert evaluation.frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)


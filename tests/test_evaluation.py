"""The sample-quality metric ranks real digits above an untrained model's samples and above noise."""
import dataclasses

import jax
import numpy as np
import pytest

from unet_flax import evaluation, training
from unet_flax.configs import PRESETS
from unet_flax.sampling import sample_images


@pytest.fixture(scope="module")
def measured():
    classifier = evaluation.classifier_params(16)  # trained on first use, then cached
    train, held_out = evaluation.digits_split(16)
    held, held_predictions = evaluation.features_and_predictions(classifier, held_out.images)
    real, _ = evaluation.features_and_predictions(classifier, train.images)

    config = dataclasses.replace(PRESETS["digits"], model=dataclasses.replace(PRESETS["digits"].model, num_classes=10))
    untrained = training.create_train_state(config, jax.random.PRNGKey(0)).params
    generated = sample_images(untrained, config, 200, np.arange(200) % 10, 10, 0.0, 2.0, seed=0, batch_size=200)
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

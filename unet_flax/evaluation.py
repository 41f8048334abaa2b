"""Sample quality for the digits data, measured: the FID recipe with a digit classifier of our own.

The Frechet distance between Gaussian fits of classifier features (the penultimate layer) of generated
and held-out real digits; the same distance between the real training and held-out splits is the
floor a perfect generator would reach. The classifier is a small CNN trained here on the training
split (`python -m unet_flax.scripts.train_classifier`, about 100 s on 2 CPU cores; the 16x16 weights are shipped in
assets/), so nothing is downloaded; it also says which digit a sample shows, for class agreement.
"""
from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import diffusion, input_pipeline
from .errors import ConfigError

HELD_OUT = 450  # of the 1,797 digits; the other 1,347 train the classifier (and the diffusion model sees all)
SPLIT_SEED = 0


def digits_split(image_size: int) -> tuple[input_pipeline.ImageData, input_pipeline.ImageData]:
    """The fixed (train, held-out) split of scikit-learn's digits at `image_size`."""
    data = input_pipeline.load(None, image_size)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(data.images))
    held_out, train = order[:HELD_OUT], order[HELD_OUT:]
    return tuple(input_pipeline.ImageData(data.images[i], data.labels[i], data.class_names, data.source)
                 for i in (train, held_out))


class DigitClassifier(nn.Module):
    features: int = 128

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """(B, H, W, 1) in [-1, 1] -> (features, logits)."""
        for width in (32, 64):
            x = nn.relu(nn.Conv(width, (3, 3))(x))
            x = nn.relu(nn.Conv(width, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.Dropout(0.3, deterministic=not train)(x)
        features = nn.relu(nn.Dense(self.features)(x))
        return features, nn.Dense(10)(features)


def train_classifier(image_size: int, steps: int = 1500, seed: int = 0) -> dict:
    """Train on the training split, with small random shifts so features do not key on position."""
    train, _ = digits_split(image_size)
    images = diffusion.from_uint8(train.images)
    model = DigitClassifier()
    key = jax.random.PRNGKey(seed)
    params = model.init(key, images[:1])["params"]
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y, key):
        shift_key, dropout_key = jax.random.split(key)
        shifts = jax.random.randint(shift_key, (2,), -1, 2)
        x = jnp.roll(x, shifts, axis=(1, 2))

        def loss_fn(p):
            _, logits = model.apply({"params": p}, x, train=True, rngs={"dropout": dropout_key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(seed)
    for i in range(steps):
        batch = rng.choice(len(images), 128, replace=False)
        params, opt_state = step(params, opt_state, images[batch], train.labels[batch], jax.random.fold_in(key, i))
    return params


SHIPPED = Path(__file__).parent / "assets" / "digit_classifier_{size}px.msgpack"


def classifier_params(image_size: int, cache_dir: str | Path | None = None) -> dict:
    """The classifier's weights: shipped for 16x16 (`python -m unet_flax.scripts.train_classifier` wrote them), so every
    machine measures with the same network; other sizes are trained on first use and cached."""
    template = DigitClassifier().init(jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 1)))["params"]
    shipped = Path(str(SHIPPED).format(size=image_size))
    if shipped.exists():
        return flax.serialization.from_bytes(template, shipped.read_bytes())
    cache_dir = Path(cache_dir or Path.home() / ".cache" / "unet_flax")
    recipe = hashlib.sha1(inspect.getsource(train_classifier).encode()).hexdigest()[:12]  # retrain on change
    path = cache_dir / f"digit_classifier_{image_size}px_{recipe}.msgpack"
    if path.exists():
        return flax.serialization.from_bytes(template, path.read_bytes())
    params = train_classifier(image_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path.write_bytes(flax.serialization.to_bytes(params))
    return params


def features_and_predictions(params: dict, images_uint8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    apply = jax.jit(lambda x: DigitClassifier().apply({"params": params}, x))
    features, predictions = [], []
    for start in range(0, len(images_uint8), 500):
        f, logits = apply(diffusion.from_uint8(images_uint8[start:start + 500]))
        features.append(np.asarray(f, np.float64))
        predictions.append(np.asarray(jnp.argmax(logits, -1)))
    return np.concatenate(features), np.concatenate(predictions)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussian fits of two feature sets."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((S_a S_b)^(1/2)) = Tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), a symmetric PSD matrix: eigh is
    # stable where sqrtm of the product is not (ReLU features leave the covariances singular).
    eigenvalues, vectors = np.linalg.eigh(cov_a)
    sqrt_a = (vectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ vectors.T
    trace_root = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a), 0, None)))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)



def check_sample_count(num_samples: int) -> None:
    if num_samples < 2:
        raise ConfigError(f"num_samples must be >= 2 for a Frechet distance, got {num_samples}")


def sample_quality(images: np.ndarray, labels: np.ndarray | None) -> dict[str, float | None]:
    """Frechet distance of uint8 digit samples to the held-out digits, the real-data floor and their
    ratio, and (with `labels`, the classes asked for) the share the classifier reads as asked."""
    check_sample_count(len(images))
    classifier = classifier_params(images.shape[1])
    train, held_out = digits_split(images.shape[1])
    train_features, _ = features_and_predictions(classifier, train.images)
    held_out_features, held_out_predictions = features_and_predictions(classifier, held_out.images)
    sample_features, sample_predictions = features_and_predictions(classifier, images)
    fd = frechet_distance(sample_features, held_out_features)
    floor = frechet_distance(train_features, held_out_features)
    return {"fd": round(fd, 4), "fd_real_floor": round(floor, 4), "fd_ratio": round(fd / floor, 3),
            "class_agreement": None if labels is None else float(np.mean(sample_predictions == labels)),
            "classifier_held_out_accuracy": float(np.mean(held_out_predictions == held_out.labels))}


if __name__ == "__main__":  # the command of earlier releases; see unet_flax.moved
    import sys

    from unet_flax.moved import run_moved_command

    sys.exit(run_moved_command("unet_flax.evaluation"))

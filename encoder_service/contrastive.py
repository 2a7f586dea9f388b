"""The self-supervised objective: what an autoencoder learns from images without labels.

Each training image is augmented twice (`encoder_service.augment`, the recipe's preset); both views go
through the autoencoder. The loss is NT-Xent (SimCLR's normalised-temperature cross-entropy) between the
two views' embeddings, which pulls each image's two views together and pushes it from every other image
of the batch, plus the reconstruction's binary cross-entropy on both views, which keeps the decoder (the
service's `Reconstruct` and its novelty score) working:

    loss = contrastive_weight * nt_xent(e1, e2, temperature) + reconstruction_weight * bce(views, decoded)

The embedding it pulls together is the served one (the unit bottleneck of `wide`), with no projection head
in between: nearest-neighbour search uses exactly what the loss shaped (measured in
`encoder_service.train`'s docstring). This module imports Keras (and so TensorFlow).
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from encoder_service.augment import augment


def nt_xent(first: Any, second: Any, temperature: float) -> Any:
    """SimCLR's loss for two batches of embeddings where row i of each is a view of the same image:
    cross-entropy of each row's cosine similarities (over `temperature`) to the 2N - 1 others, its other
    view being the right answer."""
    z = tf.math.l2_normalize(tf.concat([first, second], axis=0), axis=1)
    n = tf.shape(first)[0]
    similarity = tf.matmul(z, z, transpose_b=True) / temperature
    similarity = similarity - 1e9 * tf.eye(2 * n)  # a view is not its own positive
    positives = tf.concat([tf.range(n, 2 * n), tf.range(n)], axis=0)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(positives, similarity))


class ContrastiveTrainer(keras.Model):
    """Trains `autoencoder` (whose encoder gives `encoder`'s embedding) on unlabelled batches with the
    loss above; `fit` takes a dataset of image batches [N, H, W, C] (labels, if any, are ignored).

    Only the wrapped models are saved: this class exists for `fit` (its progress bar, history and
    callbacks) and is never served."""

    def __init__(
        self,
        autoencoder: keras.Model,
        encoder: keras.Model,
        *,
        augment_preset: str,
        temperature: float,
        contrastive_weight: float = 1.0,
        reconstruction_weight: float = 1.0,
    ) -> None:
        super().__init__(name="contrastive")
        self.joint = keras.Model(autoencoder.input, [encoder.output, autoencoder.output], name="joint")
        self.augment_preset = augment_preset
        self.temperature = temperature
        self.contrastive_weight = contrastive_weight
        self.reconstruction_weight = reconstruction_weight
        self.trackers = {
            name: keras.metrics.Mean(name=name) for name in ("loss", "contrastive", "reconstruction")
        }

    @property
    def metrics(self) -> list[Any]:
        return list(self.trackers.values())

    def call(self, images: Any, training: bool = False) -> Any:
        return self.joint(images, training=training)

    def _objective(self, images: Any, training: bool) -> dict[str, Any]:
        n = tf.shape(images)[0]
        views = tf.concat(
            [augment(images, self.augment_preset), augment(images, self.augment_preset)], axis=0
        )
        embeddings, decoded = self.joint(views, training=training)
        contrastive = nt_xent(embeddings[:n], embeddings[n:], self.temperature)
        reconstruction = tf.reduce_mean(keras.losses.binary_crossentropy(views, decoded))
        loss = self.contrastive_weight * contrastive + self.reconstruction_weight * reconstruction
        return {"loss": loss, "contrastive": contrastive, "reconstruction": reconstruction}

    def _record(self, losses: dict[str, Any]) -> dict[str, Any]:
        for name, value in losses.items():
            self.trackers[name].update_state(value)
        return {name: tracker.result() for name, tracker in self.trackers.items()}

    def train_step(self, data: Any) -> dict[str, Any]:
        images = data[0] if isinstance(data, tuple) else data
        with tf.GradientTape() as tape:
            losses = self._objective(images, training=True)
        variables = self.joint.trainable_variables
        self.optimizer.apply(tape.gradient(losses["loss"], variables), variables)
        return self._record(losses)

    def test_step(self, data: Any) -> dict[str, Any]:
        images = data[0] if isinstance(data, tuple) else data
        return self._record(self._objective(images, training=False))

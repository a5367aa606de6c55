"""Appendix A with three classes (docs/k-classes.md derives the numbers).

Class 0: 128 x 128 black; class 1: a white 64 x 64 square in the top-left
corner; class 2: the same square in grey (0.5). Patch 17, stride 17: a = 48
black and b = 16 square patches per square image. Minimizing the categorical
cross-entropy gives Q(own class | square patch) = 1 and for the black patch
Q = (1 - 2t, t, t), t = (a - b) / (3a) = 2/9, so the images' probabilities are
(5/9, 2/9, 2/9), (5/12, 5/12, 1/6) and (5/12, 1/6, 5/12).
"""

import keras
import numpy as np

from patchnet_tf import build_patchnet
from patchnet_tf.synthetic import k_class_images, k_class_optimum

TOLERANCE = 0.03


def test_closed_form_is_the_minimum_of_the_loss():
    patch, images = k_class_optimum(48, 16)
    np.testing.assert_allclose(patch, [5 / 9, 2 / 9, 2 / 9])
    np.testing.assert_allclose(images, [[5 / 9, 2 / 9, 2 / 9], [5 / 12, 5 / 12, 1 / 6], [5 / 12, 1 / 6, 5 / 12]])
    # Two classes give the paper's Appendix A back: Q(1 | black) = 1/3.
    np.testing.assert_allclose(k_class_optimum(48, 16, classes=2)[0], [2 / 3, 1 / 3])

    def loss(black):  # black: Q(. | black patch); square patches at their optimum (one-hot)
        return -sum(np.log(p) for p in (black[0], (48 * black[1] + 16) / 64, (48 * black[2] + 16) / 64))

    best = loss(patch)
    rng = np.random.default_rng(0)
    for other in rng.dirichlet(np.ones(3), 2000):
        assert loss(other) >= best - 1e-12


def test_training_reaches_the_derived_optimum():
    images, labels = k_class_images()
    model = build_patchnet(17, stride=17, channels=1, filters=16, conv_layers=3, classes=3)
    assert model.get_layer("patches")(images).shape[1] == 64
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.CategoricalCrossentropy())
    steps = 150
    # Every batch holds one image of each class, as in the derivation.
    model.fit(np.tile(images, (steps, 1, 1, 1)), np.tile(np.eye(3, dtype=np.float32), (steps, 1)),
              batch_size=3, shuffle=False, verbose=0)
    patch, expected = k_class_optimum(48, 16)
    black, white, grey = model.get_layer("subnet").predict(
        np.stack([np.full((17, 17, 1), value) for value in (0.0, 1.0, 0.5)]).astype(np.float32), verbose=0
    )
    np.testing.assert_allclose(black, patch, atol=TOLERANCE)
    assert white[1] >= 0.95 and grey[2] >= 0.95, (white, grey)
    np.testing.assert_allclose(model.predict(images, verbose=0), expected, atol=TOLERANCE)

"""Appendix A of the paper, the project's correctness anchor.

Class 0: 128 x 128 black. Class 1: black with a white 64 x 64 square in the
top-left corner. Patch 17, stride 17, zero padding: 64 patches, a = 48 shared
(black) and b = 16 class-1 (white) patches in class-1 images. The optimum is
Q(white) = 1 and Q(black) = (a - b) / (2a) = 1/3, so P(class 1) is 1/3 for
class-0 images and 1/2 for class-1 images.
"""

import keras
import numpy as np

from patchnet_tf import build_patchnet
from patchnet_tf.synthetic import appendix_a_images


def test_patchnet_converges_to_the_appendix_a_optimum():
    images, labels = appendix_a_images(image_size=128, square_size=64, channels=1)
    model = build_patchnet(17, stride=17, channels=1, filters=16, conv_layers=3)
    assert model.get_layer("patches")(images).shape[1] == 64
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.BinaryCrossentropy())
    steps = 120
    # Every batch holds both images, as in the paper's argument.
    model.fit(
        np.tile(images, (steps, 1, 1, 1)),
        np.tile(labels, steps).astype(np.float32)[:, None],
        batch_size=2,
        shuffle=False,
        verbose=0,
    )
    subnet = model.get_layer("subnet")
    black, white = subnet.predict(
        np.stack([np.zeros((17, 17, 1)), np.ones((17, 17, 1))]).astype(np.float32), verbose=0
    )[:, 0]
    assert abs(black - 1 / 3) < 0.03, black
    assert white >= 0.95, white
    class0, class1 = model.predict(images, verbose=0)[:, 0]
    assert abs(class0 - 1 / 3) < 0.03, class0
    assert abs(class1 - 1 / 2) < 0.03, class1

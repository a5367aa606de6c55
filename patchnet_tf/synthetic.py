"""The paper's Appendix A data: black images (class 0) and black images with a
white square in the top-left corner (class 1)."""

import os

import cv2
import numpy as np


def appendix_a_images(
    image_size: int = 128, square_size: int = 64, channels: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """(2, image_size, image_size, channels) float32: [class 0, class 1], labels [0, 1].

    Example:

    >>> images, labels = appendix_a_images(8, 4)
    >>> images.shape, labels.tolist(), float(images[1, :, :, 0].sum())
    ((2, 8, 8, 3), [0, 1], 16.0)
    """
    images = np.zeros((2, image_size, image_size, channels), np.float32)
    images[1, :square_size, :square_size] = 1.0
    return images, np.array([0, 1], np.int64)


def write_appendix_a_dataset(root: str, copies: int = 8, image_size: int = 128, square_size: int = 64) -> str:
    """Writes root/black/*.png (class 0) and root/square/*.png (class 1); returns `root`.

    Example:

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as root:
    ...     _ = write_appendix_a_dataset(root, copies=2, image_size=8, square_size=4)
    ...     sorted(os.listdir(os.path.join(root, "square")))
    ['000.png', '001.png']
    """
    images, _ = appendix_a_images(image_size, square_size)
    for name, image in zip(("black", "square"), images):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for index in range(copies):
            cv2.imwrite(os.path.join(root, name, f"{index:03d}.png"), (image * 255).astype(np.uint8))
    return root


def k_class_images(
    image_size: int = 128, square_size: int = 64, channels: int = 1, grey: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Appendix A with three classes (docs/k-classes.md).

    Returns (3, H, W, C) float32 [all black, white square, grey square],
    the square in the top-left corner, and labels [0, 1, 2].

    Example:

    >>> images, labels = k_class_images(8, 4)
    >>> images.shape, images[:, 0, 0, 0].tolist(), labels.tolist()
    ((3, 8, 8, 1), [0.0, 1.0, 0.5], [0, 1, 2])
    """
    images = np.zeros((3, image_size, image_size, channels), np.float32)
    images[1, :square_size, :square_size] = 1.0
    images[2, :square_size, :square_size] = grey
    return images, np.array([0, 1, 2], np.int64)


def k_class_optimum(shared: int, feature: int, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The loss-minimizing patch and image probabilities of the K-class setting.

    Every image has `shared` + `feature` patches; class 0 images are all
    shared (black) patches, a class-k image (k >= 1) has `feature` patches of
    its own feature. Returns (Q(. | shared patch), P(. | image of class k)
    for k = 0..K-1), the derivation in docs/k-classes.md: the feature patch of
    class k puts all its mass on k, and the shared patch gives
    (shared - feature) / (K * shared) to every class k >= 1.

    Example:

    >>> patch, images = k_class_optimum(3, 1)
    >>> patch.round(3), images.shape
    (array([0.556, 0.222, 0.222]), (3, 3))
    """
    if shared <= feature:
        raise ValueError("the closed form needs more shared than feature patches (a > b)")
    others = (shared - feature) / (classes * shared)
    patch = np.array([1.0 - (classes - 1) * others] + [others] * (classes - 1))
    share = shared / (shared + feature)
    images = [patch]
    for label in range(1, classes):
        images.append(share * patch + (1.0 - share) * np.eye(classes)[label])
    return patch, np.stack(images)

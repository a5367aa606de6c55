"""The paper's Appendix A data: black images (class 0) and black images with a
white square in the top-left corner (class 1)."""

import os

import cv2
import numpy as np


def appendix_a_images(image_size=128, square_size=64, channels=3):
    """(2, image_size, image_size, channels) float32: [class 0, class 1], labels [0, 1]."""
    images = np.zeros((2, image_size, image_size, channels), np.float32)
    images[1, :square_size, :square_size] = 1.0
    return images, np.array([0, 1], np.int64)


def write_appendix_a_dataset(root, copies=8, image_size=128, square_size=64):
    """Writes root/black/*.png (class 0) and root/square/*.png (class 1)."""
    images, _ = appendix_a_images(image_size, square_size)
    for name, image in zip(("black", "square"), images):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for index in range(copies):
            cv2.imwrite(os.path.join(root, name, f"{index:03d}.png"), (image * 255).astype(np.uint8))
    return root

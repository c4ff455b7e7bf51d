"""The bundled example: a small CNN trained on real handwritten digits (MNIST sample).

``digits.onnx`` was trained and exported by ``scripts/train_digits.py``; ``digits_data.npz``
holds the 1,000 held-out test images and the 200 calibration images (uint8, N x 1 x 28 x 28)
with their labels; ``digits_calib.npz`` holds the calibration images in the format
``--calibration-data`` takes (an array named after the model input).
"""

from __future__ import annotations

import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DIGITS_MODEL = os.path.join(HERE, "digits.onnx")
DIGITS_CALIBRATION = os.path.join(HERE, "digits_calib.npz")
_DIGITS_DATA = os.path.join(HERE, "digits_data.npz")


def digits_test_set() -> tuple[np.ndarray, np.ndarray]:
    """Held-out images as float32 in [0, 1] (1000, 1, 28, 28) and their labels."""
    with np.load(_DIGITS_DATA) as data:
        return data["test_x_u8"].astype(np.float32) / 255.0, data["test_y"]


def digits_calibration_set() -> tuple[np.ndarray, np.ndarray]:
    """Calibration images as float32 in [0, 1] (200, 1, 28, 28) and their labels."""
    with np.load(_DIGITS_DATA) as data:
        return data["calib_x_u8"].astype(np.float32) / 255.0, data["calib_y"]

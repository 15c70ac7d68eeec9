"""The demo's task: handwritten digits seen through a new sensor.

Data: scikit-learn's bundled ``load_digits`` (1797 grey 8x8 digits, no download), upsampled to
24x24 (bilinear) and standardized per image (zero mean, unit variance, as the device's own
preprocessing would do).

- **Source domain** (the factory's data): ``SOURCE`` digits as they are. The model is pretrained
  on them with the usual augmentation (rotation up to 15 degrees, scale and shift up to 10%, some
  blur, contrast 0.5-1, noise) -- never inverted.
- **Target domain** (the new sensor on the device): the other digits, rotated by 30 degrees,
  blurred (5x5 binomial), contrast halved around mid-grey, inverted (light background, dark
  strokes), plus Gaussian noise of sigma 0.1 (seeded). ``LABELLED`` of them are the few labelled
  samples the device trains on; the rest are the held-out test split.

:func:`pretrained` trains the model in torch in about fifteen seconds and caches the checkpoint
(keyed by this file's settings), so it is rebuilt, not shipped.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

SIZE = 24
SOURCE = 897  # digits for pretraining; the other 900 are the target domain
LABELLED = 300  # labelled target samples the device trains on; the other 600 are the test split


@dataclass(frozen=True)
class Sensor:
    """The target domain's sensor, as data (stated in the demo's summary)."""

    rotation_deg: float = 30.0
    blur: str = "5x5 binomial"
    contrast: float = 0.5
    inverted: bool = True
    noise_sigma: float = 0.1


@dataclass(frozen=True)
class Pretraining:
    epochs: int = 20
    batch: int = 64
    lr: float = 3e-3  # Adam
    seed: int = 0


@dataclass
class Task:
    source: tuple[np.ndarray, np.ndarray]
    labelled: tuple[np.ndarray, np.ndarray]  # target domain, for training on the device
    test: tuple[np.ndarray, np.ndarray]  # target domain, held out
    sensor: Sensor


def _torch_images(images: np.ndarray):
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images.astype("float32") / 16.0)[:, None]
    return F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def _standardize(x):
    return (x - x.mean((2, 3), keepdim=True)) / (x.std((2, 3), keepdim=True) + 1e-3)


def _affine(x, radians, scale=1.0, shift=None):
    """``x`` rotated by ``radians`` (one per image or one for all), scaled and shifted (fractions)."""
    import torch
    import torch.nn.functional as F

    n = len(x)
    radians = torch.as_tensor(radians, dtype=torch.float32).expand(n)
    scale = torch.as_tensor(scale, dtype=torch.float32).expand(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(radians) * scale, -torch.sin(radians) * scale
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(radians) * scale, torch.cos(radians) * scale
    if shift is not None:
        theta[:, :, 2] = shift
    return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)


def _blur(x):
    import torch
    import torch.nn.functional as F

    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
    return F.conv2d(x, (k[:, None] * k[None])[None, None], padding=2)


def through_sensor(x, sensor: Sensor, seed: int = 1):
    """Digits (N, 1, 24, 24 in [0, 1]) as the new sensor sees them, standardized."""
    import torch

    x = _affine(x, np.deg2rad(sensor.rotation_deg))
    x = _blur(x)
    x = sensor.contrast * x + (1 - sensor.contrast) / 2
    if sensor.inverted:
        x = 1 - x
    x = x + sensor.noise_sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return _standardize(x)


def load_task(sensor: Sensor = Sensor(), split_seed: int = 0) -> Task:
    """The source domain and the target domain's labelled and test splits (float32 NCHW, int64)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(split_seed).permutation(len(digits.target))
    images, labels = _torch_images(digits.images[order]), digits.target[order].astype("int64")
    source = _standardize(images[:SOURCE]).numpy()
    target = through_sensor(images[SOURCE:], sensor).numpy()
    t_labels = labels[SOURCE:]
    return Task((source, labels[:SOURCE]), (target[:LABELLED], t_labels[:LABELLED]),
                (target[LABELLED:], t_labels[LABELLED:]), sensor)


@dataclass
class NodeTask:
    """One device of a fleet: its own variant of the new sensor and its own digits through it."""

    sensor: Sensor
    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]


def node_sensor(index: int, nodes: int) -> Sensor:
    """Device ``index`` of ``nodes``: the new sensor as that device sees it (non-IID across the
    fleet): rotation spread over 15-45 degrees, contrast 0.4-0.6, noise sigma 0.05-0.2."""
    t = index / max(1, nodes - 1)
    return Sensor(rotation_deg=15.0 + 30.0 * t, contrast=0.4 + 0.2 * ((index * 3) % nodes) / max(1, nodes - 1),
                  noise_sigma=0.05 + 0.15 * ((index * 5) % nodes) / max(1, nodes - 1))


def fleet_split(nodes: int, test_fraction: float = 0.3, split_seed: int = 0) -> list[NodeTask]:
    """The target-domain digits (the 900 the source never saw) dealt into ``nodes`` disjoint
    shares, each seen through its device's sensor (:func:`node_sensor`) and split into training
    and test samples."""
    from sklearn.datasets import load_digits

    if not 1 <= nodes <= 64:
        raise ValueError(f"fleet_split: {nodes} nodes; use 1 to 64 (900 digits to share)")
    digits = load_digits()
    order = np.random.default_rng(split_seed).permutation(len(digits.target))
    images, labels = _torch_images(digits.images[order][SOURCE:]), digits.target[order][SOURCE:].astype("int64")
    shares = np.array_split(np.random.default_rng(split_seed + 1).permutation(len(labels)), nodes)
    tasks = []
    for i, share in enumerate(shares):
        sensor = node_sensor(i, nodes)
        x, y = through_sensor(images[share], sensor, seed=i + 1).numpy(), labels[share]
        cut = len(share) - int(round(test_fraction * len(share)))
        tasks.append(NodeTask(sensor, (x[:cut], y[:cut]), (x[cut:], y[cut:])))
    return tasks


def _augment(x, generator):
    import torch

    n = len(x)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * np.deg2rad(15)
    scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * 0.1
    x = _affine(x, angle, scale, (torch.rand(n, 2, generator=generator) * 2 - 1) * 0.1)
    mix = torch.rand(n, 1, 1, 1, generator=generator)
    x = mix * x + (1 - mix) * _blur(x)
    contrast = 0.5 + 0.5 * torch.rand(n, 1, 1, 1, generator=generator)
    x = contrast * x + (1 - contrast) / 2
    sigma = 0.15 * torch.rand(n, 1, 1, 1, generator=generator)
    return _standardize(x + sigma * torch.randn(x.shape, generator=generator))


def pretrain(settings: Pretraining = Pretraining(), split_seed: int = 0):
    """A :class:`pock_tvm.models.DigitsCNN` trained in torch on the source domain (eval mode)."""
    import torch
    import torch.nn.functional as F

    from ..models import DigitsCNN
    from sklearn.datasets import load_digits

    torch.manual_seed(settings.seed)
    digits = load_digits()
    order = np.random.default_rng(split_seed).permutation(len(digits.target))[:SOURCE]
    images = _torch_images(digits.images[order])
    labels = torch.from_numpy(digits.target[order].astype("int64"))
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    for _ in range(settings.epochs):
        x = _augment(images, generator)
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), settings.batch):
            batch = order[i:i + settings.batch]
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), labels[batch]).backward()
            optimizer.step()
    return model.eval()


def pretrained(cache_dir: Path, settings: Pretraining = Pretraining()):
    """:func:`pretrain`'s model, from ``cache_dir`` when this file's settings trained it before."""
    import torch

    from ..models import DigitsCNN
    from ..runtime.files import atomic_file

    key = hashlib.sha256(json.dumps(asdict(settings)).encode() + Path(__file__).read_bytes()).hexdigest()[:16]
    path = Path(cache_dir) / f"digits_cnn-{key}.pt"
    if path.exists():
        model = DigitsCNN()
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    logger.info("pretraining DigitsCNN on the source domain (torch, ~15 s)")
    model = pretrain(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    with atomic_file(path) as f:
        f.write(buffer.getvalue())
    return model


def sparse_scheme():
    """A fixed sparse scheme for :class:`~pock_tvm.models.DigitsCNN`: the BatchNorm biases of the
    last three convs, the last conv's weight and the classifier. The float-vs-int8 comparisons
    (``benchmarks/task_int8_digits.py``, ``benchmarks/bench_int8_memory.py``) train it; the demo
    searches its own."""
    from ..scheme import Rule, Scheme

    return Scheme("digits-sparse", bias=3, rules=[Rule("features.9.0.weight", "full"), Rule("classifier", "full")])

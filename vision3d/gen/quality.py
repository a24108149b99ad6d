"""A sample-quality proxy for the procedural-shape generators: a small classifier trained here.

The classifier (three conv layers, global pooling, a linear head) is trained on real procedural
images (:func:`vision3d.gen.dit.procedural_shapes`). For a set of generated images with the classes
they were asked for it reports

- ``accuracy``: the fraction the classifier assigns to the requested class (the "classification
  accuracy score" idea: good class-conditional samples are recognisable);
- ``fd``: the Fréchet distance between Gaussian fits of the classifier's pooled features of the
  generated and of held-out real images (FID's formula with a feature net trained on this data
  instead of Inception; Heusel et al., arXiv:1706.08500).

Written for vision3d, Apache-2.0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .dit import procedural_shapes

__all__ = ["ShapeClassifier", "train_classifier", "frechet_distance", "sample_quality"]


class ShapeClassifier(nn.Module):
    """``forward(images [B, 3, H, W] in [0, 1]) -> logits [B, K]``; :meth:`features` gives ``[B, 64]``."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width * 2, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width * 2, width * 2, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(width * 2, num_classes)

    def features(self, images: Tensor) -> Tensor:
        return self.net(images * 2 - 1)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


def train_classifier(
    num_classes: int, *, size: int = 16, steps: int = 300, batch_size: int = 128, seed: int = 1234
) -> tuple[ShapeClassifier, float]:
    """Train on fresh procedural batches; returns the classifier and its accuracy on 1024 held-out images."""
    torch.manual_seed(seed)
    clf = ShapeClassifier(num_classes)
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    for step in range(steps):
        x, y = procedural_shapes(batch_size, size=size, num_classes=num_classes, seed=seed * 1000 + step)
        loss = F.cross_entropy(clf(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    clf.eval()
    x, y = procedural_shapes(1024, size=size, num_classes=num_classes, seed=seed + 99)
    with torch.no_grad():
        acc = float((clf(x).argmax(-1) == y).float().mean())
    return clf, acc


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussian fits of feature sets ``a`` ``[N, D]`` and ``b`` ``[M, D]``."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    # tr sqrt(ca cb) through the eigenvalues of sqrt(ca) cb sqrt(ca) (symmetric PSD)
    ea, va = torch.linalg.eigh(ca)
    sa = va @ torch.diag(ea.clamp_min(0).sqrt()) @ va.T
    ev = torch.linalg.eigvalsh(sa @ cb @ sa).clamp_min(0)
    return float((mu_a - mu_b).square().sum() + ca.trace() + cb.trace() - 2 * ev.sqrt().sum())


@dataclass
class Quality:
    accuracy: float
    """Fraction of samples classified as their requested class."""
    fd: float
    """Fréchet distance of classifier features, samples vs real images."""


@torch.no_grad()
def sample_quality(clf: ShapeClassifier, images: Tensor, labels: Tensor, *, size: int = 16, seed: int = 4321) -> Quality:
    """Accuracy and feature Fréchet distance of generated ``images`` ``[B, 3, H, W]`` in [0, 1] for ``labels`` ``[B]``."""
    num_classes = clf.head.out_features
    real, _ = procedural_shapes(max(images.shape[0], 256), size=size, num_classes=num_classes, seed=seed)
    acc = float((clf(images).argmax(-1) == labels).float().mean())
    return Quality(acc, frechet_distance(clf.features(images), clf.features(real)))

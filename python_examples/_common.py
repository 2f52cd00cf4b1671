"""Shared pieces of the example scripts: data, the digits quality score, the J*(s) table, binned losses.

Nothing here downloads anything: the real data is scikit-learn's bundled digits (1797 8x8 images),
everything else is generated in code.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

# Run from a source checkout without installing: make `import diffkernels` find the package.
_REPO = Path(__file__).resolve().parent.parent
if (_REPO / "diffkernels" / "__init__.py").is_file() and str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from diffkernels.datasets import load_digits  # noqa: E402
from diffkernels.optimal_loss import estimate_curve  # noqa: E402


def default_device(name: Optional[str] = None) -> torch.device:
    return torch.device(name if name else ("cuda" if torch.cuda.is_available() else "cpu"))


def set_threads(n: int) -> None:
    """CPU threads for torch. The examples default to 1: these tiny models gain little from more, and on
    a shared machine OpenMP threads that wait for busy cores made each step about 10x slower (measured)."""
    if n and n > 0:
        torch.set_num_threads(n)


# --- data -------------------------------------------------------------------------------------


def load_images(spec: str = "digits", n_train: Optional[int] = None, seed: int = 0) -> Tensor:
    """Images as a float32 (N, C, H, W) tensor in [-1, 1].

    ``spec``: ``"digits"`` (scikit-learn's bundled 8x8 digits) or the path of a ``.npy`` array of
    shape (N, H, W), (N, H, W, C) with C in {1, 3, 4}, or (N, C, H, W); it is rescaled linearly from its own
    min..max to [-1, 1]. ``n_train``: keep a random subset of that many images (seeded), which is how
    the memorisation experiments get a small training set.
    """
    if spec == "digits":
        data = load_digits()
    else:
        arr = np.load(spec).astype(np.float32)
        if arr.ndim == 3:
            arr = arr[:, None]
        elif arr.ndim == 4 and arr.shape[-1] in (1, 3, 4) and arr.shape[1] == arr.shape[2]:
            arr = arr.transpose(0, 3, 1, 2)  # NHWC (square images, 1/3/4 channels last) -> NCHW
        if arr.ndim != 4:
            raise ValueError(f"{spec}: expected an array of shape (N, H, W), (N, H, W, C) or (N, C, H, W), "
                             f"got {arr.shape}")
        lo, hi = float(arr.min()), float(arr.max())
        data = torch.from_numpy(np.ascontiguousarray(arr))
        data = (data - lo) / max(hi - lo, 1e-12) * 2.0 - 1.0
    if n_train is not None and n_train < data.shape[0]:
        gen = torch.Generator().manual_seed(seed)
        data = data[torch.randperm(data.shape[0], generator=gen)[:n_train]]
    return data.contiguous()


def is_digits_shaped(x: Tensor) -> bool:
    return tuple(x.shape[1:]) == (1, 8, 8)


# --- quality score: Frechet distance in a digits classifier's feature space ---------------------

_CLASSIFIER_VERSION = "digits-mlp-v1"  # bump when the classifier or its training changes


class DigitsClassifier(nn.Module):
    """A small MLP on 8x8 digits in [-1, 1]; ``features`` is the 32-d penultimate layer.

    This is our stand-in for the Inception network of FID: FID needs a pretrained ImageNet network
    (a download, and meaningless on 8x8 digits), so we train a digits classifier once and compare
    feature statistics in its penultimate layer instead. Numbers are comparable only with each
    other, never with published FIDs.
    """

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x.clamp(-1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def cache_dir(override: Optional[str] = None) -> Path:
    cache_home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    path = Path(override) if override else cache_home / "diffkernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def digits_classifier(cache: Optional[str] = None, verbose: bool = True) -> tuple[DigitsClassifier, dict]:
    """The feature network of the quality score: trained once (a few seconds) and cached.

    Trained on a fixed 80% of the digits (seed 0), its held-out accuracy on the other 20% is
    stored next to the weights and reported with every score.
    """
    path = cache_dir(cache) / f"{_CLASSIFIER_VERSION}.pt"
    model = DigitsClassifier()
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(blob["state_dict"])
        return model.eval(), json.loads(blob["meta"])
    x, y = load_digits(return_labels=True)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=gen)
    n_tr = int(0.8 * len(x))
    tr, te = perm[:n_tr], perm[n_tr:]
    with torch.random.fork_rng(), torch.enable_grad():  # keep the caller's RNG; callers may be in no_grad
        torch.manual_seed(0)
        model = DigitsClassifier()
        opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
        for epoch in range(60):
            for idx in torch.randperm(n_tr, generator=gen).split(128):
                # light noise augmentation, so that slightly off-manifold samples still get sane features
                xb = x[tr[idx]] + 0.1 * torch.randn(len(idx), 1, 8, 8, generator=gen)
                loss = nn.functional.cross_entropy(model(xb), y[tr[idx]])
                opt.zero_grad()
                loss.backward()
                opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(x[te]).argmax(1) == y[te]).float().mean())
    meta = {"version": _CLASSIFIER_VERSION, "heldout_accuracy": acc, "train_images": n_tr, "feature_dim": 32}
    torch.save({"state_dict": model.state_dict(), "meta": json.dumps(meta)}, path)
    if verbose:
        print(f"trained the digits feature classifier (held-out accuracy {acc:.3f}); cached at {path}")
    return model, meta


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), the FID formula on given features."""
    from scipy import linalg

    mu1, mu2 = f1.mean(0), f2.mean(0)
    # A tiny ridge keeps sqrtm well defined when a ReLU feature is dead on one of the two sets.
    eye = 1e-6 * np.eye(f1.shape[1])
    s1, s2 = np.cov(f1, rowvar=False) + eye, np.cov(f2, rowvar=False) + eye
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = (covmean[0] if isinstance(covmean, tuple) else covmean).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


@torch.no_grad()
def quality_score(samples: Tensor, cache: Optional[str] = None, floor_seed: int = 0,
                  train: Optional[Tensor] = None) -> dict:
    """Frechet distance between generated digits and all 1797 real digits in classifier features.

    Also ``fd_real_floor``: the same distance for ``len(samples)`` real digits drawn at random
    (mean over 5 draws). FD is biased upward at small sample sizes, so that floor is roughly what a
    perfect generator would get (a slightly under-dispersed generator can score below it).
    With ``train`` (the training images), ``fd_train_copies``: the score of ``len(samples)`` copies
    drawn from the training set -- what a model that only reproduces its training images gets.
    """
    clf, meta = digits_classifier(cache, verbose=False)
    real = load_digits()
    f_real = clf.features(real).double().numpy()
    f_gen = clf.features(samples.float().cpu()).double().numpy()
    gen = torch.Generator().manual_seed(floor_seed)
    floor = [frechet_distance(f_real[torch.randperm(len(real), generator=gen)[: len(samples)].numpy()], f_real)
             for _ in range(5)]
    probs = clf(samples.float().cpu()).softmax(1)
    extra = {}
    if train is not None:
        copies = train[torch.randint(0, len(train), (len(samples),), generator=gen)]
        extra["fd_train_copies"] = frechet_distance(clf.features(copies.float().cpu()).double().numpy(), f_real)
    return {**extra,
        "fd": frechet_distance(f_gen, f_real),
        "fd_real_floor": float(np.mean(floor)),
        "classifier_confidence": float(probs.max(1).values.mean()),  # how digit-like single samples look
        "classifier_accuracy": meta["heldout_accuracy"],
    }


# --- the optimal loss J*(s) -------------------------------------------------------------------


def jstar_table(data: Tensor, sigmas: Sequence[float], n_queries: int = 512, seed: int = 0, device=None) -> dict:
    """J*(s)/D on a grid of VE levels with standard errors: ``diffkernels.optimal_loss.estimate_curve``
    (full estimator) with common random numbers, so the curve is smooth in s; as a JSON-ready dict."""
    device = torch.device(device) if device is not None else data.device
    curve = estimate_curve(data, [float(s) for s in sigmas], num_queries=n_queries, seed=seed, progress=False,
                           device=device, common_random_numbers=True)
    return {"sigmas": curve.sigmas.tolist(), "j_star": curve.j_star_per_element.tolist(),
            "j_star_se": curve.stderr_per_element.tolist(), "n_queries": n_queries,
            "total_variance_per_element": float(data.reshape(len(data), -1).var(0).sum() / data[0].numel())}


# --- training loss per noise-level bin --------------------------------------------------------


class BinnedLoss:
    """Sums of a per-sample loss in log-spaced noise-level bins, kept separately per training window.

    Training losses are noisy per step, but averaged over a window of steps and a bin of levels they
    can be set against J*(s) of the same levels: the difference is the part of the loss that
    training could still remove.
    """

    def __init__(self, lo: float, hi: float, bins: int, windows: int, steps: int):
        self.edges = np.geomspace(lo, hi, bins + 1)
        self.windows, self.steps = windows, steps
        self.sum = np.zeros((windows, bins))
        self.count = np.zeros((windows, bins))

    def add(self, step: int, sigma: Tensor, loss: Tensor) -> None:
        w = min(self.windows - 1, step * self.windows // max(self.steps, 1))
        b = np.searchsorted(self.edges, sigma.detach().double().cpu().numpy()) - 1
        ok = (b >= 0) & (b < len(self.edges) - 1)
        v = loss.detach().double().cpu().numpy()
        np.add.at(self.sum[w], b[ok], v[ok])
        np.add.at(self.count[w], b[ok], 1)

    def centers(self) -> np.ndarray:
        return np.sqrt(self.edges[1:] * self.edges[:-1])

    def means(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.sum / np.maximum(self.count, 1), np.nan)

    def to_dict(self) -> dict:
        return {"centers": self.centers().tolist(), "edges": self.edges.tolist(),
                "mean": [[None if math.isnan(v) else v for v in row] for row in self.means().tolist()],
                "count": self.count.astype(int).tolist()}

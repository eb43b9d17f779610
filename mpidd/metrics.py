"""Scores of dense predictions (--task regress | segment) and their losses. No MPI.

Every score is built from sums that add across samples and across boxes of one sample, so ranks
that each hold some subdomains' boxes of a field can sum them (one Allreduce) and get the scores
of the whole stitched fields: `regression_sums` / `segmentation_sums` return such sums,
`regression_scores` / `segmentation_scores` turn summed ones into scores. SSIM is the exception:
its windows cross box borders, so `ssim` takes whole fields.

    regress: mae, mse (over every value), rel_l2 (mean over samples of ||pred - target|| / ||target||),
             ssim (Wang et al. 2004: Gaussian window sigma 1.5, K1 0.01, K2 0.03)
    segment: pixel_acc, iou and dice per class, miou and mean_dice (over the classes that occur
             in the targets or the predictions)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

REGRESSION_LOSSES = ("mse", "l1")
SEGMENTATION_LOSSES = ("ce", "dice", "ce+dice")


def dense_loss(task: str, name: str):
    """loss(output, target) -> scalar mean for `task`: regress with "mse" or "l1"; segment
    (output: class scores (B, M, ...), target: int64 masks (B, ...)) with "ce" (cross-entropy),
    "dice" (1 - soft Dice, mean over classes) or "ce+dice" (their sum)."""
    if task == "regress" and name in REGRESSION_LOSSES:
        return F.mse_loss if name == "mse" else F.l1_loss
    if task == "segment" and name in SEGMENTATION_LOSSES:
        def loss(out, target):
            total = F.cross_entropy(out, target) if "ce" in name.split("+") else 0.0
            if "dice" in name:
                total = total + soft_dice_loss(out, target)
            return total
        return loss
    choices = REGRESSION_LOSSES if task == "regress" else SEGMENTATION_LOSSES
    raise ValueError(f"--loss {name} does not fit --task {task} (choose {', '.join(choices)})")


def soft_dice_loss(out, target, eps: float = 1.0):
    """1 - the soft Dice coefficient of softmax(out) and one-hot(target), averaged over classes."""
    prob = torch.softmax(out, 1)
    onehot = F.one_hot(target, out.shape[1]).movedim(-1, 1).to(prob.dtype)
    dims = [0, *range(2, out.dim())]
    inter, total = (prob * onehot).sum(dims), (prob + onehot).sum(dims)
    return 1 - ((2 * inter + eps) / (total + eps)).mean()


def regression_sums(pred, target) -> dict:
    """Additive sums of (n, C, ...) predictions against targets: the values' count, their
    absolute and squared errors, and per sample (n,) the squared norms of error and target."""
    pred, target = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    err = (pred - target).reshape(len(pred), -1)
    return {"values": err.size, "abs": float(np.abs(err).sum()), "sq": float((err ** 2).sum()),
            "err_sq": (err ** 2).sum(1), "target_sq": (target.reshape(len(target), -1) ** 2).sum(1)}


def regression_scores(sums: dict) -> dict:
    """mae, mse and rel_l2 from (summed) regression_sums."""
    rel = np.sqrt(sums["err_sq"]) / np.maximum(np.sqrt(sums["target_sq"]), 1e-12)
    return {"mae": sums["abs"] / sums["values"], "mse": sums["sq"] / sums["values"], "rel_l2": float(rel.mean())}


def segmentation_sums(pred, target, num_classes: int) -> np.ndarray:
    """The (M, M) confusion matrix of predicted masks against target masks (rows: target class,
    columns: predicted class), int64: additive over samples and boxes."""
    pred, target = np.asarray(pred).ravel().astype(np.int64), np.asarray(target).ravel().astype(np.int64)
    return np.bincount(target * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_scores(confusion) -> dict:
    """pixel_acc, per-class iou and dice, and their means over the classes that occur (in the
    targets or the predictions), from a confusion matrix (segmentation_sums)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    fp, fn = confusion.sum(0) - tp, confusion.sum(1) - tp
    occurs = (tp + fp + fn) > 0
    iou = np.where(occurs, tp / np.maximum(tp + fp + fn, 1), np.nan)
    dice = np.where(occurs, 2 * tp / np.maximum(2 * tp + fp + fn, 1), np.nan)
    return {"pixel_acc": float(tp.sum() / max(confusion.sum(), 1)), "miou": float(np.nanmean(iou)),
            "mean_dice": float(np.nanmean(dice)), "iou": [None if np.isnan(v) else float(v) for v in iou],
            "dice": [None if np.isnan(v) else float(v) for v in dice]}


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-r ** 2 / (2 * sigma ** 2))
    return w / w.sum()


def ssim(pred, target, data_range: float, sigma: float = 1.5, window: int = 11) -> np.ndarray:
    """Per sample (n,): the mean SSIM over every channel and every position where the Gaussian
    window fits whole (as scikit-image's structural_similarity(gaussian_weights=True,
    use_sample_covariance=False, data_range=...)), of (n, C, H, W) or (n, C, D, H, W) fields.
    The window shrinks to the smallest side (odd) on small fields."""
    x = torch.as_tensor(np.asarray(pred), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(target), dtype=torch.float64)
    n, c, *spatial = x.shape
    size = min(window, min(spatial) - (1 - min(spatial) % 2))
    w = _gaussian_window(size, sigma)
    x, y = x.reshape(n * c, 1, *spatial), y.reshape(n * c, 1, *spatial)

    def blur(a):  # the separable Gaussian, 'valid' on every axis
        for axis in range(len(spatial)):
            shape = [1, 1] + [1] * len(spatial)
            shape[2 + axis] = size
            a = (F.conv2d if len(spatial) == 2 else F.conv3d)(a, w.view(shape))
        return a

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.reshape(n, -1).mean(1).numpy()

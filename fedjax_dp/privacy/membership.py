"""Membership inference as a risk metric: the loss-threshold attack on held-in vs held-out clients.

Any trained model can be attacked: the attacker scores each client by minus its mean loss
under the final model (training clients tend to have lower loss) and predicts "member" above
a threshold. Reported over all thresholds: the ROC AUC, and the true-positive rate at low
false-positive rates (1% and 0.1%), which is what matters for privacy (Carlini et al., "Membership
Inference Attacks From First Principles", 2022). At user level the unit is a client, so
held-out data must be held-out CLIENTS (:func:`split_clients`), never the test split.

Losses are computed in one jitted call over padded batches; everything else is numpy on the
host. An attack metric is an empirical risk measurement of one attack, not a privacy bound.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_dp.data import FederatedData
from fedjax_dp.models import Model, cross_entropy

#: False-positive rates at which :func:`loss_threshold_attack` reports the TPR.
FPRS: tuple[float, ...] = (0.01, 0.001)


def _fpr_name(fpr: float) -> str:
    return f"{fpr * 100:g}pct"


def split_clients(
    data: FederatedData, holdout_fraction: float, *, seed: int
) -> tuple[FederatedData, FederatedData]:
    """Splits the clients of ``data`` at random into held-in and held-out clients.

    Args:
      data: a host :class:`~fedjax_dp.FederatedData`.
      holdout_fraction: fraction of clients held out, in ``(0, 1)``; at least one client
        ends up on each side.
      seed: seed of the split.

    Returns:
      ``(held_in, held_out)``, each a :class:`~fedjax_dp.FederatedData` with whole clients
      (their examples, in order), clients in their original relative order.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(
            f"holdout_fraction={holdout_fraction!r} must be strictly between 0 and 1, e.g. 0.2"
        )
    k = data.num_clients
    if k < 2:
        raise ValueError(f"need at least 2 clients to hold some out; data has {k}")
    num_out = min(max(round(k * holdout_fraction), 1), k - 1)
    perm = np.random.default_rng(seed).permutation(k)
    out = np.sort(perm[:num_out])
    held_in = np.sort(perm[num_out:])
    return subset_clients(data, held_in), subset_clients(data, out)


def subset_clients(data: FederatedData, clients: Sequence[int]) -> FederatedData:
    """The clients ``clients`` of ``data`` (host arrays), renumbered ``0..len-1`` in order."""
    clients = np.asarray(clients, np.int64)
    if clients.ndim != 1 or len(clients) == 0:
        raise ValueError("clients must be a non-empty 1-D sequence of client indices")
    offsets = np.asarray(data.offsets)[clients]
    counts = np.asarray(data.counts)[clients]
    rows = _rows(offsets, counts)
    names = data.client_names
    return FederatedData(
        x=np.asarray(data.x)[rows],
        y=np.asarray(data.y)[rows],
        offsets=(np.cumsum(counts) - counts).astype(np.int32),
        counts=counts.astype(np.int32),
        num_classes=data.num_classes,
        max_count=int(counts.max()),
        client_names=None if names is None else tuple(names[i] for i in clients),
    )


def _rows(offsets: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Example rows of clients with ``offsets``/``counts``, client after client."""
    starts = np.cumsum(counts) - counts
    return np.repeat(offsets, counts) + (np.arange(int(counts.sum())) - np.repeat(starts, counts))


@functools.partial(jax.jit, static_argnames=("apply_fn", "batch_size"))
def _example_losses(params, x, y, *, apply_fn, batch_size):
    xb = x.reshape((-1, batch_size) + x.shape[1:])
    yb = y.reshape((-1, batch_size))
    losses = jax.lax.map(lambda a: cross_entropy(apply_fn(params, a[0]), a[1]), (xb, yb))
    return losses.reshape(-1).astype(jnp.float32)


def client_losses(
    model: Model, params: Any, data: FederatedData, *, batch_size: int = 1024
) -> np.ndarray:
    """Mean cross-entropy of each client of ``data`` under ``params`` (``f64[K]``, host).

    Per-example losses come from one jitted call over padded batches (``lax.map``); the
    per-client means are a host segment sum.
    """
    x = np.asarray(data.x, np.float32)
    y = np.asarray(data.y, np.int32)
    n = x.shape[0]
    batch_size = int(min(batch_size, n))
    pad = (-n) % batch_size
    x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    y = np.concatenate([y, np.zeros((pad,), y.dtype)])
    losses = np.asarray(
        _example_losses(params, x, y, apply_fn=model.apply, batch_size=batch_size), np.float64
    )[:n]
    counts = np.asarray(data.counts, np.int64)
    rows = _rows(np.asarray(data.offsets, np.int64), counts)
    owner = np.repeat(np.arange(len(counts)), counts)
    return np.bincount(owner, weights=losses[rows], minlength=len(counts)) / counts


def roc_auc(scores_in: Sequence[float], scores_out: Sequence[float]) -> float:
    """Area under the ROC curve of "member if score >= t" (ties count one half).

    Equals ``P[score_in > score_out] + P[score_in == score_out] / 2`` over all pairs (the
    Mann-Whitney statistic).

    Examples:
      >>> roc_auc([3.0, 2.0], [1.0, 2.0])
      0.875
    """
    a = np.asarray(scores_in, np.float64)
    b = np.asarray(scores_out, np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("roc_auc needs at least one held-in and one held-out score")
    allv = np.concatenate([a, b])
    _, inv = np.unique(allv, return_inverse=True)
    counts = np.bincount(inv)
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0  # 1-based average rank of each distinct value
    rank_sum_in = float(np.sum(avg_rank[inv[: a.size]]))
    return (rank_sum_in - a.size * (a.size + 1) / 2.0) / (a.size * b.size)


def tpr_at_fpr(scores_in: Sequence[float], scores_out: Sequence[float], fpr: float) -> float:
    """The highest true-positive rate of "member if score >= t" with false-positive rate <= fpr.

    With ``n`` held-out scores at most ``k = floor(fpr * n)`` of them may be flagged, so the
    threshold must lie above the ``(k+1)``-th largest held-out score; held-in scores tied with
    it are not flagged. If ``fpr * n < 1`` this is the TPR at FPR 0.

    Examples:
      >>> tpr_at_fpr([5.0, 4.0, 3.0, 0.5], [4.5, 2.0, 1.0, 0.0], 0.25)
      0.75
    """
    a = np.asarray(scores_in, np.float64)
    b = np.sort(np.asarray(scores_out, np.float64))[::-1]
    if a.size == 0 or b.size == 0:
        raise ValueError("tpr_at_fpr needs at least one held-in and one held-out score")
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr={fpr!r} must be in [0, 1]")
    k = math.floor(fpr * b.size + 1e-9)
    if k >= b.size:
        return 1.0
    return float(np.mean(a > b[k]))


def loss_threshold_attack(
    model: Model,
    params: Any,
    held_in: FederatedData,
    held_out: FederatedData,
    *,
    fprs: Sequence[float] = FPRS,
) -> dict[str, Any]:
    """The loss-threshold membership inference attack on clients.

    Score of a client: minus its mean loss under ``params``. Members: the clients of
    ``held_in`` (trained on); non-members: those of ``held_out`` (never trained on).

    Returns:
      ``{"auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "held_in", "held_out", "note"}``:
      the AUC, the TPR at each of ``fprs``, the client counts, and a note (empty unless some
      FPR is below ``1 / held_out``, where it is really the TPR at FPR 0).
    """
    s_in = -client_losses(model, params, held_in)
    s_out = -client_losses(model, params, held_out)
    out: dict[str, Any] = {"auc": roc_auc(s_in, s_out)}
    notes = []
    for fpr in fprs:
        out[f"tpr_at_{_fpr_name(fpr)}_fpr"] = tpr_at_fpr(s_in, s_out, fpr)
        if fpr * s_out.size < 1:
            notes.append(
                f"TPR at {fpr * 100:g}% FPR needs >= {math.ceil(1 / fpr)} held-out clients; "
                f"with {s_out.size} it is the TPR at FPR 0"
            )
    out["held_in"] = int(s_in.size)
    out["held_out"] = int(s_out.size)
    out["note"] = "; ".join(notes)
    return out

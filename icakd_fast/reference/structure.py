"""Class centroids and the category-structure losses (CSKD form), plain PyTorch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: norm floor of the cosine relation (as ``F.normalize``)
NORM_EPS = 1e-12


def class_centroids(
    sums: torch.Tensor, counts: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mu[c] = (sums[c] + sum_{b: y_b=c} feats[b]) / (counts[c] + n_c)``; zero for empty classes.

    The bank part (``sums``, ``counts``) is a constant; gradient reaches ``feats``.
    Returns ``(centroids [C,D] in the wider dtype of sums and feats, total counts [C] int64)``.
    """
    out = torch.promote_types(sums.dtype, feats.dtype)
    num_classes = sums.shape[0]
    labels = labels.long()
    batch_sum = torch.zeros(num_classes, feats.shape[1], dtype=out, device=feats.device)
    batch_sum = batch_sum.index_add(0, labels, feats.to(out))
    n = torch.zeros(num_classes, dtype=torch.int64, device=labels.device).index_add_(0, labels, torch.ones_like(labels))
    total = counts.long() + n
    mu = (sums.to(out) + batch_sum) / total.clamp(min=1).unsqueeze(1).to(out)
    return mu, total


def intra_class_loss(
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    mu_s: torch.Tensor,
    mu_t: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """``mean_{b: y_b in V} || (f_s[b] - sg(mu_s[y_b])) - (f_t[b] - mu_t[y_b]) ||^2`` (0 if no row is valid)."""
    acc = torch.float64 if torch.float64 in (f_s.dtype, f_t.dtype, mu_s.dtype, mu_t.dtype) else torch.float32
    labels = labels.long()
    d = (f_s.to(acc) - mu_s.detach().index_select(0, labels).to(acc)) - (
        f_t.to(acc) - mu_t.index_select(0, labels).to(acc)
    )
    sel = valid.index_select(0, labels).to(acc)
    per_row = d.pow(2).sum(dim=1)
    return (per_row * sel).sum() / sel.sum().clamp(min=1)


def inter_class_loss(
    mu_s: torch.Tensor,
    mu_t: torch.Tensor,
    valid: torch.Tensor,
    live: torch.Tensor | None = None,
    eps: float = NORM_EPS,
) -> torch.Tensor:
    """``mean_{k,l in V} (cos(mu_s[k], mu_s[l]) - cos(mu_t[k], mu_t[l]))^2``.

    ``live`` (optional bool [C]): rows of ``mu_s`` outside it are constants (their gradient is 0).
    This oracle materialises two C x C matrices; the fast backends tile them away.
    """
    acc = torch.float64 if torch.float64 in (mu_s.dtype, mu_t.dtype) else torch.float32
    if live is not None:
        mu_s = torch.where(live.unsqueeze(1), mu_s, mu_s.detach())
    n_s = F.normalize(mu_s.to(acc), dim=1, eps=eps)
    n_t = F.normalize(mu_t.to(acc), dim=1, eps=eps)
    v = valid.to(acc)
    diff = (n_s @ n_s.T - n_t @ n_t.T) * (v.unsqueeze(0) * v.unsqueeze(1))
    nv = v.sum()
    return diff.pow(2).sum() / (nv * nv).clamp(min=1)


def kd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``, averaged over the batch."""
    acc = torch.float64 if torch.float64 in (logits_s.dtype, logits_t.dtype) else torch.float32
    log_p_s = F.log_softmax(logits_s.to(acc) / temperature, dim=1)
    log_p_t = F.log_softmax(logits_t.to(acc) / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (temperature * temperature)

"""MAR losses (Yu et al., "Unsupervised Person Re-identification by Soft Multilabel Learning",
CVPR 2019), vectorised, plus the soft multilabel memory.

Notation: f (B, D) L2-normalised features, A (Np, D) the L2-normalised reference agents (the
source classifier's weights), y = softmax(scale · f Aᵀ) the soft multilabel; loss names are the paper's.
    MDL (soft multilabel-guided hard negative mining): among the `mining_ratio` most similar
        pairs of a batch, pairs with multilabel agreement A(y_i, y_j) = 1 - ‖y_i - y_j‖₁ / 2 above
        a threshold are positives P, the rest hard negatives N;
        L = -log(P̄ / (P̄ + N̄)),  P̄, N̄ = mean exp(-‖f_i - f_j‖²) over each set.
    CML (cross-view consistent soft multilabel learning): per camera v, log-multilabels
        ~ N(μ_v, diag σ_v²); the simplified 2-Wasserstein distance to the dataset-wide (μ, σ):
        L = mean_v ‖μ_v - μ‖² + ‖σ_v - σ‖².
    AL (reference agent learning): L = CE(scale · f Aᵀ, w) on labelled source images.
    RJ (joint embedding with the agents): source f pulled to its agent a_w and pushed beyond the
        margin m from the other agents within it; target f pushed beyond m from every agent within
        it: the mean of ‖f_i - a_wi‖², [m - ‖f_i - a_k‖²]_+ and [m - ‖f_j - a_k‖²]_+ (hinges
        averaged over each sample's hard agents).
Thresholds and centres are running statistics, as in the authors' code (src/utils.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def soft_multilabels(feats: torch.Tensor, agents: torch.Tensor, scale: float) -> torch.Tensor:
    """log y, y = softmax(scale · f Aᵀ) the soft multilabels: (B, D), (Np, D) -> (B, Np)."""
    return F.log_softmax(scale * feats @ agents.T, dim=1)


def agreement(ml: torch.Tensor) -> torch.Tensor:
    """The multilabel agreement: (B, Np) multilabels -> (B, B) pairwise agreements 1 - ‖y_i - y_j‖₁ / 2."""
    return 1 - torch.cdist(ml, ml, p=1) / 2


def _upper_pairs(n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.triu_indices(n, n, offset=1, device=device).unbind(0)


def agreement_threshold(agree: torch.Tensor, mining_ratio: float) -> torch.Tensor:
    """The agreement of the k-th most agreeing pair, k = int(#pairs · mining_ratio) (at least 1)."""
    k = max(1, int(len(agree) * mining_ratio))
    return agree.topk(k).values[-1]


class MultilabelDiscriminativeLoss(nn.Module):
    """MDL = -log(P̄ / (P̄ + N̄)) with the threshold kept as an EMA (momentum 0.1) of each batch's quantile."""

    def __init__(self, mining_ratio: float, momentum: float = 0.1):
        super().__init__()
        self.mining_ratio, self.momentum = mining_ratio, momentum
        self.register_buffer("threshold", torch.tensor(0.0))

    @torch.no_grad()
    def init_threshold(self, multilabels: torch.Tensor) -> None:
        """From the multilabels of the whole target set (N, Np)."""
        i, j = _upper_pairs(len(multilabels), multilabels.device)
        self.threshold.fill_(agreement_threshold(agreement(multilabels)[i, j], self.mining_ratio))

    def forward(self, feats: torch.Tensor, multilabels: torch.Tensor,
                pids: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """feats (B, D) normalised, multilabels (B, Np) (the memory's rows) -> loss, stats.

        `pids` (B,), ground truth, only count the mined positives that are true (`mdl_true_pos_pairs`)."""
        i, j = _upper_pairs(len(feats), feats.device)
        sq = (feats[i] - feats[j]).pow(2).sum(1)                       # (#pairs,)
        with torch.no_grad():
            agree = agreement(multilabels)[i, j]
            k = max(1, int(len(sq) * self.mining_ratio))
            similar = sq.detach().topk(k, largest=False).indices     # the most similar pairs
            pos = agree[similar] > self.threshold
            self.threshold.mul_(1 - self.momentum).add_(self.momentum * agreement_threshold(agree, self.mining_ratio))
        e = torch.exp(-sq[similar])
        # the authors' fallbacks: no positives -> P̄ = 1; no hard negatives -> N̄ = 0.5
        p_bar = e[pos].mean() if pos.any() else e.new_tensor(1.0)
        n_bar = e[~pos].mean() if (~pos).any() else e.new_tensor(0.5)
        loss = -torch.log(p_bar / (p_bar + n_bar))
        stats = {"mdl_pos_pairs": pos.sum().float(), "mdl_threshold": self.threshold.clone()}
        if pids is not None:
            stats["mdl_true_pos_pairs"] = (pids[i[similar[pos]]] == pids[j[similar[pos]]]).sum().float()
        return loss, stats


def camera_stats(x: torch.Tensor, cams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-camera mean and (unbiased) std of rows of x (B, C): (V, C), (V, C) and the cameras with ≥ 2 rows."""
    uniq, inv = torch.unique(cams, return_inverse=True)
    count = torch.zeros(len(uniq), device=x.device, dtype=x.dtype).index_add_(0, inv, torch.ones_like(x[:, 0]))
    mean = torch.zeros(len(uniq), x.shape[1], device=x.device, dtype=x.dtype).index_add_(0, inv, x) / count[:, None]
    sq = torch.zeros_like(mean).index_add_(0, inv, (x - mean[inv]).pow(2))
    keep = count > 1
    var = sq[keep] / (count[keep, None] - 1)
    return mean[keep], var.clamp(min=1e-12).sqrt(), keep


class CrossViewMultilabelLoss(nn.Module):
    """CML, simplified 2-Wasserstein form: every camera's log-multilabel Gaussian pulled to the dataset-wide one.

    The dataset-wide (μ, σ) start as the mean over cameras of the whole target set's per-camera
    statistics and follow each batch with momentum `momentum` (the authors: batch size / 10,000).
    """

    def __init__(self, num_agents: int, momentum: float):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center_mean", torch.zeros(num_agents))
        self.register_buffer("center_std", torch.ones(num_agents))

    @torch.no_grad()
    def init_centers(self, log_ml: torch.Tensor, cams: torch.Tensor) -> None:
        mean, std, _ = camera_stats(log_ml, cams)
        self.center_mean.copy_(mean.mean(0))
        self.center_std.copy_(std.mean(0))

    def forward(self, log_ml: torch.Tensor, cams: torch.Tensor) -> torch.Tensor:
        """log_ml (B, Np) log multilabels, cams (B,) -> scalar."""
        mean, std, _ = camera_stats(log_ml, cams)
        if len(mean) == 0:
            return log_ml.sum() * 0
        with torch.no_grad():
            m = self.momentum
            self.center_mean.mul_(1 - m).add_(m * mean.mean(0))
            self.center_std.mul_(1 - m).add_(m * std.mean(0))
        # the authors average the mean and the std terms as separate entries: (Σ_v ... ) / 2V
        return ((mean - self.center_mean).pow(2).sum(1) + (std - self.center_std).pow(2).sum(1)).mean() / 2


def agent_loss(feats: torch.Tensor, agents: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """AL: CE over the scaled cosine similarities to the agents. (B, D), (Np, D), (B,) -> scalar."""
    return F.cross_entropy(scale * feats @ agents.T, labels)


def joint_embedding_loss(feats: torch.Tensor, labels: torch.Tensor, t_feats: torch.Tensor, agents: torch.Tensor,
                         margin: float = 1.0) -> torch.Tensor:
    """RJ for source feats (B, D) with labels (B,) and target t_feats (B', D); agents (Np, D) detached.

    A hard agent is one closer than the margin (‖f - a‖² < m); each sample's hinge terms are averaged
    over its hard agents, and the loss is the mean of all terms (positives plus one per sample that has
    hard agents), as in the authors' JointLoss.
    """
    agents = agents.detach()
    d_s = torch.cdist(feats, agents).pow(2)                             # (B, Np)
    own = F.one_hot(labels, len(agents)).bool()
    pos = d_s[own]                                                       # (B,)
    terms, count = pos.sum(), pos.new_tensor(float(len(pos)))
    for d, mask in ((d_s, ~own), (torch.cdist(t_feats, agents).pow(2), None)):
        hard = (d < margin) if mask is None else (d < margin) & mask
        n_hard = hard.sum(1)
        has = n_hard > 0
        hinge = (margin - d).clamp(min=0) * hard
        terms = terms + (hinge.sum(1)[has] / n_hard[has]).sum()
        count = count + has.sum()
    return terms / count


class MultilabelMemory(nn.Module):
    """Per-image soft multilabels of the target set, y ← 0.9 · y + 0.1 · y_new.

    Under DDP the batch's (indices, multilabels) are all-gathered first, so every rank applies
    the same update and the memory stays identical across ranks.
    """

    def __init__(self, num_images: int, num_agents: int, momentum: float = 0.1):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("labels", torch.zeros(num_images, num_agents))

    @torch.no_grad()
    def update(self, indices: torch.Tensor, multilabels: torch.Tensor) -> None:
        indices, multilabels = indices.to(self.labels.device), multilabels.detach().to(self.labels)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            indices, multilabels = all_gather_cat(indices), all_gather_cat(multilabels)
        self.labels[indices] = (1 - self.momentum) * self.labels[indices] + self.momentum * multilabels


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks of equally shaped tensors (no gradient)."""
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)

"""BoT strong baseline (Luo et al., "Bag of Tricks and a Strong Baseline for Deep Person
Re-identification", CVPRW 2019), trained on the labelled source domain.

Tricks: warmup (10 epochs, linear from 0.1×), random erasing (0.5), label smoothing
(ε = 0.1), last stride 1, BNNeck; P×K = 16×4; Adam 3.5e-4. Loss per step:
    L = L_ID(classifier(BN(f_t)), y) + triplet_weight · L_tri(f_t, y)        (BoT Eq. 1/Fig. 3)
The triplet term mines hard examples over the global batch across workers.
Evaluated on the source test split (supervised) and the target (direct transfer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reid_ray.data.loader import build_train_loader, relabel
from reid_ray.losses import CrossEntropyLabelSmooth, TripletLoss
from reid_ray.methods.base import EpochContext, Method, gather_batch, register_method, unwrap
from reid_ray.models.reid_net import build_reid_net


@dataclass
class BaselineParams:
    epsilon: float = 0.1          # label smoothing ε
    margin: float = 0.3           # triplet margin m
    soft_margin: bool = False     # softplus instead of the hinge
    triplet_weight: float = 1.0   # weight of the triplet term


@register_method
class Baseline(Method):
    name = "baseline"
    Params = BaselineParams
    adapts = False
    device_skip = True  # its state moves only through the optimiser

    def setup(self, wrap=lambda m: m) -> None:
        cfg = self.cfg
        labels, _ = relabel(self.domains.source.train["pid"].to_numpy())
        self.num_classes = int(labels.max()) + 1
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        net = build_reid_net(cfg.model, self.num_classes, self.device)
        self.models = {"net": wrap(net)}
        self.build_optimizer(net)
        self.train_loader = build_train_loader(self.domains.source.train, labels, cfg.transform, cfg.loader,
                                               rank=self.rank, world_size=self.world_size, seed=cfg.seed)
        self.ce = CrossEntropyLabelSmooth(self.p.epsilon)
        self.triplet = TripletLoss(self.p.margin, self.p.soft_margin)

    def train_step(self, batch: dict, ctx: EpochContext) -> dict[str, torch.Tensor]:
        img, y = batch["img"].to(self.device, non_blocking=True), batch["label"].to(self.device, non_blocking=True)
        out = self.models["net"](img)
        ce = self.ce(out["logits"], y)
        feats, labels = gather_batch(out["feat"], y)
        tri = self.triplet(feats, labels)
        acc = (out["logits"].argmax(1) == y).float().mean()
        return {"loss": ce + self.p.triplet_weight * tri, "ce": ce, "triplet": tri, "acc": acc}

    def eval_model(self):
        return unwrap(self.models["net"])

"""Plain k-means self-training: the pseudo-label baseline that UDA and unsupervised re-ID methods improve on (Fan
et al., "Unsupervised Person Re-identification: Clustering and Fine-tuning" (PUL), ACM TOMM 2018; the
"pseudo labels alone" baseline of MMT, Ge et al., ICLR 2020, Table 4). One network, no mean teacher, no memory.

Per epoch: the network's features of every target training image are clustered by k-means into `num_clusters`
(in the PseudoLabeler actor); the classifier is reset to the L2-normalised centroids (as MMT's) and the Adam
moments start afresh (the rows are new clusters). Per step, on a batch of the pseudo-labels (`target_sampler`:
P clusters × K images by default) and the BoT losses on them:
    L = L_id(classifier(BN(f)), ŷ) + L_tri(f, ŷ)        (label-smoothed CE, ε 0.1; batch-hard triplet, margin 0.3)
The network starts from the source-trained BoT baseline (`source_init`, the UDA setting), or, with
`--source none`, from `model.pretrained` (ImageNet; random weights for the embedded `small` network): the fully
unsupervised setting's plain reference, beside SpCL and Cluster Contrast. Schedule: MMT's (Adam 3.5e-4, constant,
no warmup), as the baseline MMT's paper compares against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reid_ray import ReidRayError
from reid_ray.clustering.client import ClusterSpec
from reid_ray.data.loader import ImageDataset, build_test_loader, build_train_loader
from reid_ray.data.transforms import train_transform
from reid_ray.evaluation import extract_features
from reid_ray.losses import CrossEntropyLabelSmooth, TripletLoss
from reid_ray.methods.base import EpochContext, Method, check_batch, gather_batch, register_method, unwrap
from reid_ray.models.adabn import adapt_bn
from reid_ray.models.reid_net import build_reid_net


@dataclass
class SelfTrainingParams:
    num_clusters: int = 500       # k of k-means (MMT's k for a Market target); the embedded default ~0.7× the true ids
    epsilon: float = 0.1          # label smoothing of L_id
    margin: float = 0.3           # triplet margin
    iters: int = 400              # iterations per epoch (0: one pass of the sampler)
    target_sampler: str = "pk"    # pk (P clusters × K images) | cross_camera (MMT's sampler)
    source_init: bool = True      # start from a source-trained baseline (False: from model.pretrained)
    adabn_init: bool = True       # BN statistics re-estimated on the target before the first clustering


@register_method
class SelfTraining(Method):
    name = "self_training"
    Params = SelfTrainingParams
    needs_source_init = True
    uses_clustering = True
    device_skip = True  # its state moves only through the optimiser
    choices = {"params.target_sampler": ("pk", "cross_camera")}
    config_defaults = {"optim.warmup_epochs": 0, "optim.milestones": (), "epochs": 40}
    # MMT's embedded settings: k = 100 for the 150 target ids, 40 iterations an epoch, 10 epochs
    synthetic_overrides = {"params.num_clusters": 100, "params.iters": 40, "epochs": 10, "eval_every": 2}
    unsupervised = {"params.source_init": False}
    # from random weights (--source none on the embedded benchmark): Cluster Contrast's 20 epochs from scratch
    # (seed 0: target mAP 9.9 at epoch 4, 14.4 at 20; bench/RESULTS.md "The fully unsupervised setting")
    synthetic_unsupervised = {"epochs": 20, "eval_every": 4}

    @classmethod
    def cluster_spec(cls, cfg) -> ClusterSpec:
        return ClusterSpec(algorithm="kmeans", num_clusters=cfg.params.num_clusters, seed=cfg.seed)

    @classmethod
    def check(cls, cfg, domains) -> None:
        p, n = cfg.params, domains.target.train.num_rows
        if not 2 <= p.num_clusters < n:
            raise ReidRayError(f"params.num_clusters={p.num_clusters}: k-means needs 2 ≤ k < the {n} target "
                               f"training images of {cfg.target} (--set params.num_clusters=K)")
        if p.iters < 0 or not 0 <= p.epsilon < 1 or p.margin < 0:
            raise ReidRayError(f"self-training needs iters ≥ 0, 0 ≤ epsilon < 1 and margin ≥ 0; got iters={p.iters}, "
                               f"epsilon={p.epsilon}, margin={p.margin} (--set params.NAME=VALUE)")
        check_batch(n, cfg.loader.num_identities * cfg.loader.num_instances, cfg.workers, f"target {cfg.target}",
                    "--set loader.num_identities=P")

    def setup(self, wrap=lambda m: m) -> None:
        cfg, p = self.cfg, self.p
        target = self.domains.target.train
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        net = build_reid_net(cfg.model, p.num_clusters, self.device)
        if self.init_state is not None:  # the source classifier's rows are source identities: not loaded
            net.load_state_dict({k: v for k, v in self.init_state.items() if not k.startswith("classifier.")},
                                strict=False)
        self.models = {"net": wrap(net)}
        self.build_optimizer(net)
        self.dataset = ImageDataset(target, train_transform(cfg.transform), in_memory=cfg.loader.in_memory)
        self.extract_loader = build_test_loader(target, cfg.transform, cfg.loader, rank=self.rank,
                                                world_size=self.world_size)
        self.ce, self.triplet = CrossEntropyLabelSmooth(p.epsilon), TripletLoss(p.margin)
        self.started, self.last_stats = False, {}

    def on_epoch_start(self, ctx: EpochContext) -> None:
        if self.clusterer is None:
            raise ReidRayError("self-training needs a clusterer (the PseudoLabeler actor or --clustering local)")
        if not self.started and ctx.epoch == 0 and self.p.adabn_init:
            adapt_bn(self.eval_model(), self.extract_loader, self.device)
        self.started = True
        feats, _, _ = extract_features(self.eval_model(), self.extract_loader, device=self.device)
        res = self.clusterer.refresh(feats.numpy(), ctx.epoch)  # this rank's shard
        w = self.eval_model().classifier.weight.data
        w.copy_(torch.as_tensor(res.centroids, device=w.device))  # normalised centroids, one row per cluster
        self.optimizer.state.clear()  # the rows are new clusters: their old moments point elsewhere
        self.train_loader = build_train_loader(
            self.domains.target.train, res.labels, self.cfg.transform, self.cfg.loader, rank=self.rank,
            world_size=self.world_size, seed=self.cfg.seed, dataset=self.dataset, sampler=self.p.target_sampler)
        self.train_loader.sampler.set_epoch(ctx.epoch)
        self.last_stats = {f"pseudo_{k}": v for k, v in res.stats.items()}
        self.last_stats["pseudo_clusters"] = float(len(res.centroids))

    def iterations(self) -> int | None:
        return self.p.iters or None

    def train_step(self, batch: dict, ctx: EpochContext) -> dict[str, torch.Tensor]:
        dev = self.device
        x, y = batch["img"].to(dev, non_blocking=True), batch["label"].to(dev, non_blocking=True)
        out = self.models["net"](x)
        ce = self.ce(out["logits"], y)
        feats, labels = gather_batch(out["feat"], y)
        tri = self.triplet(feats, labels)
        return {"loss": ce + tri, "ce": ce, "triplet": tri, "acc": (out["logits"].argmax(1) == y).float().mean()}

    def epoch_metrics(self) -> dict[str, float]:
        return self.last_stats

    def eval_model(self):
        return unwrap(self.models["net"])

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.started = True

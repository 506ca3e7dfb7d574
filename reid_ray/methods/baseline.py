"""BoT strong baseline (Luo et al., "Bag of Tricks and a Strong Baseline for Deep Person
Re-identification", CVPRW 2019), trained on the labelled source domain.

Tricks: warmup (10 epochs, linear from 0.1×), random erasing (0.5), label smoothing
(ε = 0.1), last stride 1, BNNeck; P×K = 16×4; Adam 3.5e-4. Loss per step:
    L = L_ID(classifier(BN(f_t)), y) + triplet_weight · L_tri(f_t, y) + β · L_C(f_t, y)   (BoT Eq. 1/Fig. 3, Eq. 6)
The triplet term mines hard examples over the global batch across workers.
Evaluated on the source test split (supervised) and the target (direct transfer).

Switches, each off by default (today's recipe) unless a preset turns it on:
- `center_loss_weight` β (BoT's last trick, Sec. 4.5; losses/center.py): L_C = 1/B Σ_i ||f_t,i - c_{y_i}||²
  on the pooled feature f_t, as the authors' code normalises it (the paper writes ½ Σ_i), the squared
  distances clamped to [1e-12, 1e12]; one centre per source identity, drawn from N(0, 1). The centres take
  their own plain SGD step after the network's (`center_lr`, the authors' 0.5, no momentum, no schedule) on
  the gradient of β·L_C times 1/β, i.e. ∂L_C/∂c: their update does not depend on β. The authors'
  configs/softmax_triplet_with_center.yml: β = 0.0005, lr 0.5; the real-data presets set it (`presets`). It
  stays 0 on the embedded benchmark until it is measured there (its numbers were all obtained without it).
  Under DDP the network's L_C is taken over the global batch (as the triplet's), and each rank's centre
  gradient of its own share is averaged over the ranks (one all-reduce of C×D a step, as DDP averages the
  network's), so every rank applies the same update and the centres stay identical. They are checkpointed
  (`state_dict["center_loss"]`); their step honours a device-side skip (`ctx.step_ok`), so the method keeps
  `device_skip`.
- `triplet`: "hinge" (BoT: [m + d_ap - d_an]_+, margin `margin`, or softplus with `soft_margin`) |
  "softmax": MMT's source pretraining (Ge et al., ICLR 2020; the authors' PreTrainer with
  SoftTripletLoss(margin=0), mmt/loss/triplet.py): the log-softmax over (d_ap, d_an) of each anchor's hardest
  positive and negative (Euclidean distances of the unnormalised f_t), L = mean_a -log(e^{d_an} / (e^{d_ap} +
  e^{d_an})) (losses/mmt.py's SoftmaxTripletLoss with hard labels). This equals log(1 + e^{d_ap - d_an}), the
  soft-margin triplet (`soft_margin=true`); `margin` is not used.
- `target_bn_batches`: each step also forwards a target training batch (P×K images drawn uniformly, the
  training transform, no labels) through the network in train mode without gradients, after the source
  batch: no loss, but the BatchNorm running statistics move towards the target's, as in the authors'
  PreTrainer ("target samples: only forward"). An epoch stays one pass of the source; the target loader
  restarts (a new order) whenever it runs out.
MMT asks for the last two for its source models (`MMT.pretrain_params`, `params.source_recipe`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from reid_ray import ReidRayError
from reid_ray.data.loader import ImageDataset, build_train_loader, relabel
from reid_ray.data.paired import PairedLoader, build_shuffle_loader
from reid_ray.data.transforms import train_transform
from reid_ray.losses import CenterLoss, CrossEntropyLabelSmooth, TripletLoss
from reid_ray.losses.mmt import SoftmaxTripletLoss
from reid_ray.methods.base import EpochContext, Method, check_batch, gather_batch, register_method, unwrap
from reid_ray.models.reid_net import build_reid_net

_PRESETS = ("duke2market", "market2duke", "market2msmt", "msmt2market")


@dataclass
class BaselineParams:
    epsilon: float = 0.1          # label smoothing ε
    margin: float = 0.3           # triplet margin m (triplet="hinge")
    soft_margin: bool = False     # softplus instead of the hinge
    triplet_weight: float = 1.0   # weight of the triplet term
    triplet: str = "hinge"        # hinge (BoT's batch-hard triplet) | softmax (MMT's pretraining: SoftTripletLoss, margin 0)
    center_loss_weight: float = 0.0  # β of BoT's center loss (0: off; the authors' 0.0005 in the real-data presets)
    center_lr: float = 0.5        # lr of the centres' own SGD (the authors' CENTER_LR)
    target_bn_batches: bool = False  # each step also forwards a target batch (train mode, no gradient, no loss):
    #                                  BN running statistics follow the target too (MMT's PreTrainer)


@register_method
class Baseline(Method):
    name = "baseline"
    Params = BaselineParams
    adapts = False  # target images, with `target_bn_batches`, only move BatchNorm statistics: no target loss
    # its state moves only through the optimiser and `after_step` (the centres' step honours ctx.step_ok); the
    # BatchNorm statistics move in the forward passes, as every method's (a skipped step's forward included)
    device_skip = True
    graphable = True  # model.cuda_graph: one shape, nothing read from the host between steps
    choices = {"params.triplet": ("hinge", "softmax")}
    # BoT's full recipe on the real benchmarks: + center loss (β = 0.0005, the authors' configs)
    presets = {name: {"params.center_loss_weight": 0.0005} for name in _PRESETS}

    @classmethod
    def check(cls, cfg, domains) -> None:
        super().check(cfg, domains)
        p = cfg.params
        if p.center_loss_weight < 0 or (p.center_loss_weight > 0 and p.center_lr <= 0):
            raise ReidRayError(f"params.center_loss_weight={p.center_loss_weight} must be ≥ 0 and params.center_lr="
                               f"{p.center_lr} > 0 (--set params.center_loss_weight=0.0005)")
        if p.target_bn_batches:
            check_batch(domains.target.train.num_rows, cfg.loader.num_identities * cfg.loader.num_instances,
                        cfg.workers, f"target {cfg.target}", "--set loader.num_identities=P")

    def setup(self, wrap=lambda m: m) -> None:
        cfg, p = self.cfg, self.p
        labels, _ = relabel(self.domains.source.train["pid"].to_numpy())
        self.num_classes = int(labels.max()) + 1
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        net = build_reid_net(cfg.model, self.num_classes, self.device)
        self.models = {"net": wrap(net)}
        self.build_optimizer(net)
        self.train_loader = build_train_loader(self.domains.source.train, labels, cfg.transform, cfg.loader,
                                               rank=self.rank, world_size=self.world_size, seed=cfg.seed)
        if p.target_bn_batches:
            target = ImageDataset(self.domains.target.train, train_transform(cfg.transform),
                                  in_memory=cfg.loader.in_memory)
            self.train_loader = PairedLoader(self.train_loader, build_shuffle_loader(  # one pass of the source
                target, cfg.loader.num_identities * cfg.loader.num_instances, rank=self.rank,
                world_size=self.world_size, seed=cfg.seed, lcfg=cfg.loader), lead="source")
        self.ce = CrossEntropyLabelSmooth(p.epsilon)
        self.triplet = SoftmaxTripletLoss() if p.triplet == "softmax" else TripletLoss(p.margin, p.soft_margin)
        self.center_loss = None
        self.center_batch = None  # this rank's (features, labels) of the step, for the centres' step
        if p.center_loss_weight > 0:
            # a generator of its own: the global RNG (and with it every other draw of the run) stays as without
            g = torch.Generator().manual_seed(cfg.seed)
            self.center_loss = CenterLoss(self.num_classes, net.feat_dim, generator=g).to(self.device)

    def train_step(self, batch: dict, ctx: EpochContext) -> dict[str, torch.Tensor]:
        img, y = batch["img"].to(self.device, non_blocking=True), batch["label"].to(self.device, non_blocking=True)
        out = self.models["net"](img)
        if "t_img" in batch:  # target_bn_batches: BatchNorm statistics only (the authors' order: source, then target)
            with torch.no_grad():
                unwrap(self.models["net"])(batch["t_img"].to(self.device, non_blocking=True))
        ce = self.ce(out["logits"], y)
        feats, labels = gather_batch(out["feat"], y)
        tri = self.triplet(feats, labels)
        loss = ce + self.p.triplet_weight * tri
        losses = {"ce": ce, "triplet": tri}
        if self.center_loss is not None:
            center = self.center_loss(feats, labels)
            loss = loss + self.p.center_loss_weight * center
            losses["center"] = center.detach()
            self.center_batch = (out["feat"].detach().float(), y)
        acc = (out["logits"].argmax(1) == y).float().mean()
        return {"loss": loss, **losses, "acc": acc}

    def after_step(self, ctx: EpochContext) -> None:
        """The centres' SGD step (center loss on): ∂L_C/∂c of this rank's share, averaged over the ranks."""
        if self.center_loss is None or self.center_batch is None:
            return
        feats, labels = self.center_batch
        grad = self.center_loss.gradient(feats, labels)
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(grad)  # shares of equal size: the mean of the ranks' gradients is the global batch's
            grad.div_(self.world_size)
        self.center_loss.sgd_step(grad, self.p.center_lr, ctx.step_ok)
        self.center_batch = None

    def eval_model(self):
        return unwrap(self.models["net"])

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.center_loss is not None:
            state["center_loss"] = self.center_loss.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.center_loss is not None:
            if "center_loss" not in state:
                raise ReidRayError("params.center_loss_weight > 0, but the checkpoint holds no centres (it was "
                                   "trained without the center loss); resume with --set params.center_loss_weight=0")
            self.center_loss.load_state_dict(state["center_loss"])


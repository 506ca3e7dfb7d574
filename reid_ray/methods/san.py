"""SAN (Jin et al., "Semantics-Aligned Representation Learning for Person Re-identification",
AAAI 2020): the BoT encoder (SA-Enc) learns semantically aligned features by also regenerating
each person's aligned full texture image through a decoder (SA-Dec) that is dropped at inference.

Trained on the labelled source domain, with pseudo ground-truth textures beside its images
(`texture/`, see data/texture.py; made by `reid-ray san-pg predict`, shipped by the synthetic
benchmark). Per step (Sec. 3, Eq. 1-4):
    L = L_ID + triplet_weight·L_tri + rec_weight·L_rec + tr_weight·L_TR
L_ID and L_tri are the baseline's (label-smoothed CE on BN(f_t), batch-hard triplet on f_t over
the global batch); L_rec is the per-sample L1 to the texture, L_TR batch-hard triplets (tr_margin)
on the decoder blocks' pooled features, mined over the global batch (losses/san.py).
`tr_weight` 0 is the paper's "SAN w/o TR". As the authors, L_rec and L_TR take their own optimiser step
(`texture_step`: Adam, lr 1e-5, β1 0.5, over encoder and decoder, ~35× below the ReID lr), after the ReID
step on L_ID + L_tri; the texture gradients come from the same forward pass (`torch.autograd.grad`), are
averaged over the ranks as DDP would, and are applied in `after_step`. `texture_step=false` sums all four
losses into one step instead. The evaluated and checkpointed `net` is the encoder
alone, with the baseline's keys, so `--init` from a SAN checkpoint starts MMT/ECN/MAR from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from reid_ray.data.loader import ImageDataset, build_train_loader, relabel
from reid_ray.data.texture import TextureDataset, texture_folder, texture_paths
from reid_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD, test_transform, train_transform
from reid_ray.losses import CrossEntropyLabelSmooth, TripletLoss
from reid_ray.losses.san import DecoderTripletLoss, reconstruction_loss
from reid_ray.methods.base import EpochContext, Method, gather_batch, register_method, unwrap
from reid_ray.models.reid_net import build_reid_net
from reid_ray.models.san_decoder import build_san_model
from reid_ray.models.sync_bn import convert_sync_bn


@dataclass
class SANParams:
    epsilon: float = 0.1          # label smoothing ε of L_ID
    margin: float = 0.3           # triplet margin of L_tri (encoder)
    soft_margin: bool = False     # softplus instead of the hinge
    triplet_weight: float = 1.0   # weight of L_tri
    rec_weight: float = 1.0       # λ_rec: weight of the L1 texture reconstruction
    tr_weight: float = 1.0        # λ_tr: weight of the decoder's triplet ReID constraints (0: SAN w/o TR)
    tr_margin: float = 0.3        # margin of L_TR
    texture_dir: str = "texture"  # folder of pseudo ground-truth textures beside the split folders
    texture_height: int = 256     # decoded texture size (the paper: 256×256)
    texture_width: int = 256
    texture_step: bool = True     # the reconstruction and TR losses take their own Adam step (the authors':
                                  # lr texture_lr, β1 texture_beta1) over encoder + decoder; False: one step
    texture_lr: float = 1e-5      # of the sum of all four losses with the ReID optimiser
    texture_beta1: float = 0.5


@register_method
class SAN(Method):
    name = "san"
    Params = SANParams
    adapts = False
    # the synthetic textures are 64×64 (front | back); 32×32 keeps the decoder cheap on CPU
    synthetic_overrides = {"params.texture_height": 32, "params.texture_width": 32}

    def setup(self, wrap=lambda m: m) -> None:
        cfg, p = self.cfg, self.p
        source = self.domains.source
        labels, _ = relabel(source.train["pid"].to_numpy())
        self.num_classes = int(labels.max()) + 1
        self.size = (p.texture_height, p.texture_width)
        folder = texture_folder(source, p.texture_dir)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        net = build_reid_net(cfg.model, self.num_classes, self.device)
        model = build_san_model(net, self.size)
        if cfg.model.sync_bn:
            model.decoder = convert_sync_bn(model.decoder, self.device)
        self.dec_dims = model.decoder.block_dims
        self.models = {"san": wrap(model.to(self.device))}
        self.build_optimizer(model.net if p.texture_step else model)  # the decoder: the texture optimiser's
        self.texture_params = [q for q in model.parameters() if q.requires_grad]
        self.texture_optimizer = torch.optim.Adam(self.texture_params, lr=p.texture_lr, betas=(p.texture_beta1, 0.999))
        self.texture_grads: tuple | None = None
        images = ImageDataset(source.train, train_transform(cfg.transform), labels, in_memory=cfg.loader.in_memory)
        self.textures = texture_paths(source.train, folder)
        dataset = TextureDataset(images, self.textures, self.size)
        self.train_loader = build_train_loader(source.train, labels, cfg.transform, cfg.loader, rank=self.rank,
                                               world_size=self.world_size, seed=cfg.seed, dataset=dataset)
        self.ce = CrossEntropyLabelSmooth(p.epsilon)
        self.triplet = TripletLoss(p.margin, p.soft_margin)
        self.tr = DecoderTripletLoss(p.tr_margin)
        self.epoch = 0

    def on_epoch_start(self, ctx: EpochContext) -> None:
        self.epoch = ctx.epoch
        super().on_epoch_start(ctx)

    def train_step(self, batch: dict, ctx: EpochContext) -> dict[str, torch.Tensor]:
        dev, p = self.device, self.p
        img, y = batch["img"].to(dev, non_blocking=True), batch["label"].to(dev, non_blocking=True)
        out = self.models["san"](img)
        ce = self.ce(out["logits"], y)
        feats, labels = gather_batch(out["feat"], y)
        tri = self.triplet(feats, labels)
        rec = reconstruction_loss(out["texture"], batch["texture"].to(dev, non_blocking=True))
        dec, _ = gather_batch(torch.cat(out["dec_feats"], 1), y)  # one all-gather for all blocks
        tr = self.tr(dec.split(self.dec_dims, 1), labels)
        reid, texture = ce + p.triplet_weight * tri, p.rec_weight * rec + p.tr_weight * tr
        if p.texture_step:  # the texture losses' gradients, for their own optimiser's step in after_step
            self.texture_grads = torch.autograd.grad(texture, self.texture_params, retain_graph=True,
                                                     allow_unused=True)
            loss = reid + 0.0 * texture  # the decoder stays in DDP's graph (its gradients are zeros here)
        else:
            loss = reid + texture
        acc = (out["logits"].argmax(1) == y).float().mean()
        return {"loss": loss, "ce": ce, "triplet": tri, "rec": rec, "tr": tr, "acc": acc}

    def after_step(self, ctx: EpochContext) -> None:
        """The texture step (`texture_step`): the gradients of L_rec + L_TR, averaged over the ranks as DDP
        would, applied by the texture optimiser after the ReID step."""
        if self.texture_grads is None:
            return
        grads = [torch.zeros_like(q) if g is None else g for q, g in zip(self.texture_params, self.texture_grads)]
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat)
            grads = list(flat.div_(self.world_size).split([g.numel() for g in grads]))
        for q, g in zip(self.texture_params, grads):
            q.grad = g.view_as(q)
        self.texture_optimizer.step()
        self.texture_optimizer.zero_grad(set_to_none=True)
        self.texture_grads = None

    def eval_model(self):
        return unwrap(self.models["san"]).net

    # the checkpoint keeps the encoder under "net" with ReIDNet's keys and the decoder apart: the default layout,
    # so `--init` and the default `retrieval_networks` read the encoder alone
    def state_dict(self) -> dict:
        model = unwrap(self.models["san"])
        return {"models": {"net": model.net.state_dict(), "decoder": model.decoder.state_dict()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "texture_optimizer": self.texture_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        model = unwrap(self.models["san"])
        model.net.load_state_dict(state["models"]["net"])
        model.decoder.load_state_dict(state["models"]["decoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "texture_optimizer" in state:
            self.texture_optimizer.load_state_dict(state["texture_optimizer"])

    @torch.no_grad()
    def eval_artifacts(self, run_dir: str | Path, n: int = 8) -> list[Path]:
        """A PNG of `n` source training identities: rows of (input, target texture, decoded texture)."""
        from PIL import Image

        model = unwrap(self.models["san"])
        table = self.domains.source.train
        rows = np.unique(table["pid"].to_numpy(), return_index=True)[1][:n].tolist()  # first image of n ids
        images = ImageDataset(table.take(rows), test_transform(self.cfg.transform))
        ds = TextureDataset(images, [self.textures[i] for i in rows], self.size)
        batch = [ds[i] for i in range(len(ds))]
        img = torch.stack([b["img"] for b in batch]).to(self.device)
        was = model.training
        model.eval()
        pred = model(img)["texture"].float()
        model.train(was)
        h = self.size[0]
        inp = torch.nn.functional.interpolate(img, size=(h, max(1, h * img.shape[3] // img.shape[2])),
                                              mode="bilinear", align_corners=False)
        tgt = torch.stack([b["texture"] for b in batch]).to(self.device)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        pad = torch.ones(len(rows), 3, h, 2, device=self.device)
        grid = torch.cat([(inp * std + mean), pad, tgt * std + mean, pad, pred * std + mean], 3)
        grid = torch.cat(list(torch.nn.functional.pad(grid, (0, 0, 0, 2), value=1.0)), 1)  # rows stacked
        path = Path(run_dir) / f"san_textures_e{self.epoch + 1:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = (grid.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype("uint8")
        Image.fromarray(pixels).resize((pixels.shape[1] * 2, pixels.shape[0] * 2), Image.NEAREST).save(path)
        return [path]

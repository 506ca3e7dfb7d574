"""SAN-PG: SAN's pseudo texture generator (Jin et al., AAAI 2020, Sec. 3.3). An encoder + decoder
trained with the reconstruction loss alone on paired (person image, aligned texture) data, then
run over a re-ID dataset to give every image a pseudo ground-truth texture for SAN.

    reid-ray san-pg pairs --dataset synth-a --data-root data --out pg/     # pg/pairs.txt
    reid-ray san-pg train --pairs pg/ [--out pg/san_pg.pt] [--epochs 10]
    reid-ray san-pg predict --checkpoint pg/san_pg.pt --dataset synth-b --data-root data
        # -> data/synth-b/texture/<image stem>.png, for every image of every split

`pairs.txt` holds one `image_path texture_path` per line, relative to its folder. Plain PyTorch in
this process (no Ray): it is a small pre-step. Checkpoints and PNGs are written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2 as T

from reid_ray import ReidRayError
from reid_ray.data.loader import ImageDataset
from reid_ray.data.readers import SPLITS, read_dataset
from reid_ray.data.texture import TextureDataset, dataset_top, texture_paths
from reid_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TransformConfig, test_transform
from reid_ray.losses.san import reconstruction_loss
from reid_ray.models.reid_net import ModelConfig, build_reid_net
from reid_ray.models.san_decoder import SANModel, build_san_model

PAIRS_FILE = "pairs.txt"


def _table(paths: list[str]) -> pa.Table:
    n = len(paths)
    return pa.table({"path": paths, "pid": [0] * n, "camid": [0] * n})


def write_pairs(args: argparse.Namespace) -> int:
    ds = read_dataset(args.dataset, args.data_root)
    folder = dataset_top(ds) / args.texture_dir
    if not folder.is_dir():
        raise ReidRayError(f"san-pg pairs needs ground-truth textures in {folder} (the synthetic benchmark ships "
                           f"them; regenerate it without --no-texture)")
    table = ds.split(args.split)
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"{os.path.relpath(img, out)} {os.path.relpath(tex, out)}"
             for img, tex in zip(table["path"].to_pylist(), texture_paths(table, folder))]
    _atomic_text(out / PAIRS_FILE, "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} pairs to {out / PAIRS_FILE}")
    return 0


def read_pairs(folder: Path) -> tuple[list[str], list[Path]]:
    list_file = folder / PAIRS_FILE
    if not list_file.is_file():
        raise ReidRayError(f"--pairs {folder}: no {PAIRS_FILE} there; write one with `reid-ray san-pg pairs "
                           f"--dataset synth-a --data-root DATA --out {folder}` (lines: image_path texture_path)")
    images, textures = [], []
    for lineno, line in enumerate(list_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ReidRayError(f"{list_file}:{lineno}: expected 'image_path texture_path', got {line!r}")
        img, tex = (folder / p for p in parts)
        for p in (img, tex):
            if not p.is_file():
                raise ReidRayError(f"{list_file}:{lineno}: {p} does not exist (paths are relative to {folder})")
        images.append(str(img))
        textures.append(tex)
    if not images:
        raise ReidRayError(f"{list_file} lists no pairs")
    return images, textures


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def train(args: argparse.Namespace) -> int:
    from reid_ray.tracking.progress import bar

    folder = Path(args.pairs).expanduser().resolve()
    images, textures = read_pairs(folder)
    size, tex_size = tuple(args.image_size), tuple(args.texture_size)
    # camera-style jitter (brightness, contrast) and crops; no flips or hue changes: the texture is aligned
    tf = T.Compose([T.ToImage(), T.Resize(size, antialias=True), T.ColorJitter(0.4, 0.4), T.Pad(size[1] // 8),
                    T.RandomCrop(size), T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
                    T.ToPureTensor()])  # v2, on the uint8 tensors ImageDataset decodes
    ds = TextureDataset(ImageDataset(_table(images), tf), textures, tex_size)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=len(ds) > args.batch_size,
                        num_workers=args.num_workers)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_san_model(build_reid_net(ModelConfig(arch=args.arch, sync_bn=False), 1, device), tex_size)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    model.train()
    for epoch in range(args.epochs):
        total, n = 0.0, 0
        with bar(len(loader), f"san-pg epoch {epoch + 1}/{args.epochs}", "batches") as progress:
            for batch in loader:
                loss = reconstruction_loss(model(batch["img"].to(device))["texture"], batch["texture"].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, n = total + loss.item(), n + 1
                progress.update()
                progress.info(f"rec {total / n:.4f}")
    out = Path(args.out).expanduser().resolve() if args.out else folder / "san_pg.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {"san_pg": 1, "models": {"net": model.net.state_dict(), "decoder": model.decoder.state_dict()},
             "arch": args.arch, "image_size": size, "texture_size": tex_size, "epochs": args.epochs,
             "rec": total / max(n, 1)}
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, out)
    print(f"wrote {out} (reconstruction L1 {total / max(n, 1):.4f} in the last epoch)")
    return 0


def load_generator(path: str, device: torch.device) -> tuple[SANModel, dict]:
    if not Path(path).is_file():
        raise ReidRayError(f"--checkpoint {path}: no such file; train one with `reid-ray san-pg train`")
    try:  # the safe loader: tensors and plain values only, so a shared file cannot run code
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a torch file, or one holding objects the safe loader refuses
        state = None
    if not isinstance(state, dict) or "san_pg" not in state:
        raise ReidRayError(f"--checkpoint {path} is not a SAN-PG checkpoint (written by `reid-ray san-pg train`)")
    net = build_reid_net(ModelConfig(arch=state["arch"], sync_bn=False), 1, device)
    model = build_san_model(net, state["texture_size"])
    model.net.load_state_dict(state["models"]["net"])
    model.decoder.load_state_dict(state["models"]["decoder"])
    return model.eval(), state


@torch.no_grad()
def predict(args: argparse.Namespace) -> int:
    from PIL import Image

    from reid_ray.tracking.progress import bar

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, state = load_generator(args.checkpoint, device)
    ds = read_dataset(args.dataset, args.data_root)
    out = Path(args.out).expanduser().resolve() if args.out else dataset_top(ds) / "texture"
    out.mkdir(parents=True, exist_ok=True)
    h, w = state["image_size"]
    tf = test_transform(TransformConfig(height=h, width=w))
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    written: set[str] = set()
    clashes = 0
    # train last: where two splits share an image name, SAN (which trains on train) gets the train image's
    for split in sorted(SPLITS, key=lambda s: s == "train"):
        table = ds.split(split)
        paths = table["path"].to_pylist()
        loader = DataLoader(ImageDataset(table, tf), batch_size=args.batch_size)
        with bar(len(loader), f"san-pg predict {ds.name}/{split}", "batches") as progress:
            for batch in loader:
                tex = model(batch["img"].to(device))["texture"].float() * std + mean
                pixels = (tex.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype("uint8")
                for i, px in zip(batch["index"].tolist(), pixels):
                    stem = Path(paths[i]).stem
                    clashes += stem in written
                    written.add(stem)
                    tmp = out / f".{stem}.png.tmp"
                    Image.fromarray(px).save(tmp, format="PNG")
                    os.replace(tmp, out / f"{stem}.png")
                progress.update()
    print(f"wrote {len(written)} textures to {out}"
          + (f" ({clashes} image names occur in two splits: the train image's texture was kept)" if clashes else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reid-ray san-pg", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pairs", help="write pairs.txt for a dataset that has ground-truth textures (synthetic)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--out", required=True, help="folder to write pairs.txt into")
    p.add_argument("--split", default="train", choices=SPLITS)
    p.add_argument("--texture-dir", default="texture")
    p.set_defaults(fn=write_pairs)

    p = sub.add_parser("train", help="train the generator on DIR/pairs.txt (reconstruction loss only)")
    p.add_argument("--pairs", required=True, help="folder holding pairs.txt")
    p.add_argument("--out", default="", help="checkpoint path (default: DIR/san_pg.pt)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--arch", default="small")
    p.add_argument("--image-size", type=int, nargs=2, default=(64, 32), metavar=("H", "W"))
    p.add_argument("--texture-size", type=int, nargs=2, default=(32, 32), metavar=("H", "W"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=train)

    p = sub.add_parser("predict", help="write a pseudo texture for every image of a dataset")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--out", default="", help="texture folder (default: <dataset top>/texture, where SAN reads)")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(fn=predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from reid_ray.cli import run_cli

    args = build_parser().parse_args(argv)
    return run_cli(args.fn, args)


if __name__ == "__main__":
    sys.exit(main())

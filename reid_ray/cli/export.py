"""Getting a trained embedder out of reid-ray: ONNX export, embedding a folder, evaluating any checkpoint.

    reid-ray export --checkpoint outputs/<run>/best.pt --onnx embedder.onnx
    reid-ray embed --checkpoint outputs/<run>/best.pt --images photos/ --out feats.parquet
    reid-ray evaluate --checkpoint outputs/<run>/best.pt --dataset market1501 --data-root /datasets [--rerank]

The flags and what is printed; the work is in `reid_ray.inference` (which network of a checkpoint, its input
transform: `inference.embedder`).
"""

from __future__ import annotations

import argparse
import time

from reid_ray import ReidRayError, storage
from reid_ray.inference.embedder import CHECKPOINT_HELP, load_embedder, pick_device

NET_HELP = "which network of a multi-network checkpoint (default: the one its evaluation reports"


def main_export(argv: list[str] | None = None) -> int:
    """reid-ray export --checkpoint C --onnx OUT.onnx [--net NAME]"""
    from reid_ray.cli import run_cli
    from reid_ray.inference.onnx import export_onnx, require_onnx

    p = argparse.ArgumentParser(
        prog="reid-ray export",
        description="Write a checkpoint's retrieval embedder (backbone + BNNeck feature, L2-normalised, what "
                    "evaluation ranks by) as ONNX. Input 'images': float32 (N, 3, H, W) at the checkpoint's "
                    "image size (transform.height x width), RGB scaled to [0, 1] then normalised with the ImageNet "
                    "mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) -- the caller applies that, the graph "
                    "does not; output 'features': float32 (N, D); N is dynamic. The file's metadata holds the "
                    "mean, std, size and the checkpoint's sha256 (model_digest).")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--onnx", required=True, help="the .onnx file to write (replaced atomically)")
    p.add_argument("--net", default=None, help=f"{NET_HELP}, e.g. MMT's mean_net1)")
    p.add_argument("--no-check", action="store_true", help="skip comparing onnxruntime's features with torch's")
    args = p.parse_args(argv)

    def _run(a) -> int:
        require_onnx("export")
        storage.check_file(a.onnx, "--onnx", writes=True)  # a wrong path fails before the checkpoint loads
        emb = load_embedder(a.checkpoint, a.net)
        t0 = time.perf_counter()
        res = export_onnx(emb, a.onnx, check=not a.no_check)
        hh, ww = emb.size
        check = "" if a.no_check else f"; onnxruntime = torch to {res['max_abs_diff']:.1e}"
        print(f"wrote {res['path']} ({emb.method} {emb.network}, input images (N, 3, {hh}, {ww}) ImageNet-normalised, "
              f"output features (N, {emb.dim}) L2-normalised; {res['exporter']} exporter, "
              f"{time.perf_counter() - t0:.1f} s{check})")
        return 0

    return run_cli(_run, args)


def main_embed(argv: list[str] | None = None) -> int:
    """reid-ray embed --checkpoint C --images DIR --out feats.parquet"""
    from reid_ray.cli import run_cli
    from reid_ray.inference.parquet import embed_folder, list_images

    p = argparse.ArgumentParser(
        prog="reid-ray embed",
        description="Embed every .jpg/.jpeg/.png image of a folder (recursively, sorted) with a checkpoint's "
                    "retrieval network (its test transform; L2-normalised BNNeck features, what evaluation ranks "
                    "by) into a Parquet file: columns path (inside the folder), feature (D float32) and "
                    "model_digest (the checkpoint's sha256, also in the schema's metadata).")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--images", required=True, help="folder of images (searched recursively); folder:PATH, the "
                                                  "spelling --target takes, works too")
    p.add_argument("--out", required=True, help="the .parquet file to write (replaced atomically)")
    p.add_argument("--net", default=None, help=f"{NET_HELP})")
    p.add_argument("--batch-size", type=int, default=None, help="default: the checkpoint's loader.test_batch_size")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one), cpu, cuda, cuda:N")
    args = p.parse_args(argv)

    def _run(a) -> int:
        device = pick_device(a.device)
        a.images = a.images.removeprefix("folder:")
        list_images(a.images)  # a wrong folder or file fails before the checkpoint loads
        storage.check_file(a.out, "--out", writes=True)
        emb = load_embedder(a.checkpoint, a.net, device)
        t0 = time.perf_counter()
        res = embed_folder(emb, a.images, a.out, batch_size=a.batch_size, device=device)
        print(f"wrote {res['path']}: {res['images']} images x {res['dim']} features ({emb.method} {emb.network}, "
              f"model_digest {emb.digest[:12]}..., {time.perf_counter() - t0:.1f} s)")
        return 0

    return run_cli(_run, args)


def main_evaluate(argv: list[str] | None = None) -> int:
    """reid-ray evaluate --checkpoint C --dataset NAME --data-root R [--rerank] [--visualize N [--visualize-out P]]"""
    from reid_ray.cli import run_cli
    from reid_ray.inference.evaluate import evaluate_checkpoint, results_table

    p = argparse.ArgumentParser(
        prog="reid-ray evaluate",
        description="mAP and CMC (R1, R5, R10; Market-1501's protocol) of a checkpoint's retrieval network on a "
                    "dataset's query/gallery split, as training evaluates (training.loop.evaluate_model); --rerank "
                    "adds the k-reciprocal re-ranked figures.")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--dataset", required=True, help="market1501, dukemtmc, msmt17 (msmt17-all), cuhk03np "
                                                    "(cuhk03np-detected), synth-a, synth-b, or folder:PATH (your own "
                                                    "unlabelled images: ranked lists with --visualize, no mAP)")
    p.add_argument("--data-root", default=None, help="folder that holds the dataset's own top folder (not for "
                                                     "folder:PATH)")
    p.add_argument("--rerank", action="store_true", help="also k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3)")
    p.add_argument("--net", default=None, help=f"{NET_HELP})")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one), cpu, cuda, cuda:N")
    p.add_argument("--visualize", type=int, default=0, metavar="N",
                   help="also draw N random queries' top-10 gallery images (green: same identity, red: not; by the "
                        "plain distances) as one PNG (default 0: none)")
    p.add_argument("--visualize-out", default="ranked_lists.png",
                   help="the PNG --visualize writes (replaced atomically; default ranked_lists.png here)")
    args = p.parse_args(argv)

    def _run(a) -> int:
        from rich.console import Console

        from reid_ray.data.readers import read_dataset

        device = pick_device(a.device)
        read_dataset(a.dataset, a.data_root)  # a wrong name or root fails before the checkpoint loads
        if a.visualize > 0:
            if storage.is_uri(a.visualize_out):
                raise ReidRayError(f"--visualize-out {a.visualize_out}: pass a local file's path, not a URI")
            storage.check_file(a.visualize_out, "--visualize-out", writes=True)
        emb = load_embedder(a.checkpoint, a.net, device)
        res = evaluate_checkpoint(emb, a.dataset, a.data_root, rerank=a.rerank, device=device,
                                  visualize=a.visualize, visualize_out=a.visualize_out)
        console = Console()
        console.print(results_table(emb, res))
        console.print(f"checkpoint {emb.path} (sha256 {emb.digest[:12]}...)")
        if "visualization" in res:
            console.print(f"wrote {res['visualization']} ({a.visualize} queries' ranked lists)", soft_wrap=True)
        return 0

    return run_cli(_run, args)

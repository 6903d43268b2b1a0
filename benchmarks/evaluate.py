"""The paper's quality metrics (Sec. 5) for a folder of images written by `python minisplam.py sample`:
FID against reference images (torchmetrics) and CLIP score against the prompts of its manifest.jsonl (transformers).

    python benchmarks/evaluate.py --images gen4/ --reference coco2014_val_512/ --clip-model openai/clip-vit-large-patch14

Nothing is downloaded: the Inception weights (torch-fidelity's FID Inception) and the CLIP model are read from a
local path or cache, and a missing one is refused, with one line and exit code 2, before any work. The result is
printed and written to IMAGES/eval.json.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minisplam as ms  # noqa: E402

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"          # torch-fidelity's FID Inception weights


def image_files(folder: Path, what: str):
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")
                   and not p.name.startswith(".") and p.name != "grid.png") if folder.is_dir() else []
    if len(files) < 2:
        raise ms.UsageError(f"{what} {folder} needs a folder with at least 2 images")
    return files


def read_image(f: Path, size: int):
    try:
        with Image.open(f) as im:
            return np.array(im.convert("RGB").resize((size, size), Image.BICUBIC))
    except (OSError, ValueError) as e:
        raise ms.UsageError(f"cannot read the image {f} ({type(e).__name__}): remove it or replace it") from None


def fid_extractor(args):
    """torch-fidelity's Inception from a local file, or any TorchScript (N, 3, H, W) uint8 -> (N, D) module."""
    if args.fid_features != "inception":
        try:
            return torch.jit.load(args.fid_features)
        except (OSError, ValueError, RuntimeError) as e:
            raise ms.UsageError(f"--fid-features {args.fid_features} is not a TorchScript file ({type(e).__name__}): "
                                "give 'inception' or a file saved with torch.jit.save") from None
    weights = Path(args.inception_weights or Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE)
    if not weights.is_file():
        raise ms.UsageError(f"FID needs the Inception weights {INCEPTION_FILE} at {weights}: download them where "
                            "there is internet (torch-fidelity fetches them on first use) or pass --inception-weights")
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as e:
        raise ms.UsageError(f"FID with Inception needs torchmetrics and torch-fidelity ({e}): "
                            "pip install -e '.[eval]'") from e
    try:
        return NoTrainInceptionV3("inception-v3-compat", ["2048"], str(weights))
    except Exception as e:                                      # a file that is not these weights
        raise ms.UsageError(f"{weights} does not hold torch-fidelity's Inception weights ({type(e).__name__})") from None


def load_clip(name: str):
    """CLIP model and processor from a local folder or a cached hub id, loaded before any work (torchmetrics'
    CLIPScore is not used: with transformers 5 its image features fail, 'BaseModelOutputWithPooling' object has no
    attribute 'norm')."""
    from transformers import CLIPModel, CLIPProcessor

    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise ms.UsageError(f"--clip-model {name} is a file: give a folder saved by CLIPModel.save_pretrained "
                            "or a cached hub id")
    if not path.is_dir():
        from huggingface_hub import try_to_load_from_cache

        try:  # a string that is not a valid repo id raises HFValidationError
            cached = try_to_load_from_cache(name, "config.json")
        except Exception:
            cached = None
        if not isinstance(cached, str):
            raise ms.UsageError(f"CLIP model {name!r} is neither a local folder nor in the Hugging Face cache: "
                                "download it where there is internet (e.g. `huggingface-cli download "
                                "openai/clip-vit-large-patch14`) or pass a local folder")
    try:
        return CLIPModel.from_pretrained(name).eval(), CLIPProcessor.from_pretrained(name)
    except (OSError, ValueError, TypeError) as e:
        raise ms.UsageError(f"--clip-model {name} is not a CLIP model with its processor ({type(e).__name__}): "
                            "give a folder saved by CLIPModel and CLIPProcessor.save_pretrained") from None


def evaluate(args) -> dict:
    images = Path(args.images)
    fakes = image_files(images, "--images")
    reals = image_files(Path(args.reference), "--reference") if args.reference else None
    if not reals and not args.clip_model:
        raise ms.UsageError("give --reference (for FID) and/or --clip-model (for the CLIP score)")
    prompt = {}
    if args.clip_model:
        man = images / "manifest.jsonl"
        if not man.is_file():
            raise ms.UsageError(f"the CLIP score needs {man}: make the images with `minisplam.py sample`")
        try:
            prompt = {r["file"]: r["prompt"] for r in map(json.loads, man.read_text().splitlines()) if r}
        except (ValueError, TypeError, KeyError):
            raise ms.UsageError(f"{man} is not a manifest written by `minisplam.py sample`") from None
        model, proc = load_clip(args.clip_model)
    extractor = fid_extractor(args) if reals else None

    def batches(files, desc):                                    # uint8 (B, 3, size, size), as the metrics take
        for i in tqdm(range(0, len(files), args.batch_size), desc=desc, unit="batch"):
            arr = [read_image(f, args.size) for f in files[i:i + args.batch_size]]
            yield files[i:i + args.batch_size], torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2)

    result = {"images": str(images.resolve()), "n_images": len(fakes)}
    if reals:
        from torchmetrics.image.fid import FrechetInceptionDistance

        fid = FrechetInceptionDistance(feature=extractor)
        for real, files in ((True, reals), (False, fakes)):
            for _, x in batches(files, f"FID {'reference' if real else 'images'}"):
                fid.update(x, real=real)
        result.update(fid=fid.compute().item(), reference=str(Path(args.reference).resolve()), n_reference=len(reals))
    if prompt:
        scored, scores = [f for f in fakes if f.name in prompt], []
        for files, x in batches(scored, "CLIP score"):
            with torch.no_grad():                      # CLIP score = 100 max(cos(image, text), 0) (Hessel et al.)
                out = model(**proc(text=[prompt[f.name] for f in files], images=list(x), return_tensors="pt",
                                   padding=True, truncation=True))
            scores.append(100 * torch.cosine_similarity(out.image_embeds, out.text_embeds).clamp(min=0))
        result.update(clip_score=torch.cat(scores).mean().item(), clip_model=args.clip_model, n_clip=len(scored))
    ms._write_atomic(images / "eval.json", json.dumps(result, indent=1))
    return result


def build_parser():
    p = ms.cli_parser(prog="evaluate.py", description=__doc__.split("\n")[0])
    p.add_argument("--images", type=ms.path_arg, required=True, help="folder written by `sample` (images + manifest.jsonl)")
    p.add_argument("--reference", type=ms.path_arg, help="folder of reference images for FID (e.g. COCO val at 512 px)")
    p.add_argument("--fid-features", type=ms.path_arg, default="inception",
                   help="'inception' (torch-fidelity's FID Inception) or a TorchScript file (N,3,H,W) uint8 -> (N,D)")
    p.add_argument("--inception-weights", type=ms.path_arg, help=f"local {INCEPTION_FILE}; default: the torch hub cache")
    p.add_argument("--clip-model", type=ms.path_arg, help="local folder or cached hub id of a CLIP model, e.g. "
                                                      "openai/clip-vit-large-patch14 (the paper: OpenCLIP ViT-g/14)")
    p.add_argument("--size", type=ms.number_arg(int, 1, 4096), default=299, help="images are resized to size x size")
    p.add_argument("--batch-size", type=ms.number_arg(int, 1, 65536), default=50, help="images per batch")
    p.add_argument("--verbose", action="store_true", help="also show the libraries' warnings")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    ms.quiet_libraries(args.verbose)
    try:
        res = evaluate(args)
    except ms.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()

"""A tiny, randomly initialised Stable Diffusion (or SDXL) teacher pipeline, for tests and CPU smoke runs.

    python -m toy.tiny_sd OUT [--arch sdxl] [--prediction-type v_prediction]

Its images are noise; its code paths are SD's / SDXL's (two text encoders, pooled embeddings, size/crop time ids).
Every part is built here from a config, with a local tokenizer vocabulary: nothing is downloaded.
`toy/shapes_sd.py` trains its UNet into a teacher whose images mean something.
"""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

import minisplam as ms


def make_tiny_sd(out_dir: str, prediction_type: str = "epsilon", seed: int = 0, arch: str = "sd") -> str:
    """Write the pipeline to `out_dir` (a new or empty folder); returns its absolute path."""
    ms.check_prediction_type(prediction_type)                # refused before the heavy imports
    out = ms.check_output(Path(out_dir), "OUT", overwrite=None)
    from diffusers import (AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: i + 2 for i, c in enumerate(
        list(letters) + [c + "</w>" for c in letters])}}
    tmp = Path(tempfile.mkdtemp(dir=out))                     # a local vocabulary: no download
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=16)
    shutil.rmtree(tmp)
    te = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                        pad_token_id=1, projection_dim=32)
    xl = arch == "sdxl"
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64 if xl else 32,
                                attention_head_dim=8, norm_num_groups=8,
                                **(dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                                        projection_class_embeddings_input_dim=32 + 6 * 8) if xl else {}))
    parts = dict(unet=unet, text_encoder=CLIPTextModel(te), tokenizer=tok,
                 vae=AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                                   sample_size=16),
                 scheduler=DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         prediction_type=prediction_type, clip_sample=False, steps_offset=1))
    if xl:
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=CLIPTextModelWithProjection(te), tokenizer_2=tok)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(out)
    umask = os.umask(0)                                      # the umask's permissions: safetensors writes 0600
    os.umask(umask)
    for p in out.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
    return str(out)


def build_parser():
    p = ms.cli_parser(prog="python -m toy.tiny_sd", description=__doc__.split("\n")[0])
    p.add_argument("out", type=ms.path_arg, help="a new or empty folder")
    p.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction"],
                   help="what the UNet predicts")
    p.add_argument("--arch", default="sd", choices=["sd", "sdxl"], help="SD 1.x layout, or SDXL's two text encoders")
    p.add_argument("--verbose", action="store_true", help="also show the libraries' warnings")
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    ms.quiet_libraries(a.verbose)
    try:
        out = make_tiny_sd(a.out, a.prediction_type, arch=a.arch)
    except ms.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"wrote a tiny random {a.arch.upper()} teacher to {out}")
    return out


if __name__ == "__main__":
    main()

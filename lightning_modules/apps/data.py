"""``ctrlgen data synth|pack|inspect|refstats|tokenize``: make, pack, inspect and tokenize WebDataset shards, and
reference statistics for FID. Building the parser imports nothing heavy (``ctrlgen data --help`` needs no torch); each
tool imports its code when it runs. Errors of the tools (a bad ``--out``, key collisions, stale shards, missing
labels) reach the entry point as exceptions and print as one line there (``ctrlgen.lightning_modules.cli``)."""

from __future__ import annotations

import argparse
import json


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctrlgen data", description="make, pack and inspect WebDataset shards")
    sub = p.add_subparsers(dest="tool", required=True)
    s = sub.add_parser("synth", help="write a deterministic synthetic world as shards")
    s.add_argument("--world", default="shapes")
    s.add_argument("--out", required=True)
    s.add_argument("--n-train", type=int, default=512)
    s.add_argument("--n-val", type=int, default=64)
    s.add_argument("--n-test", type=int, default=64)
    s.add_argument("--size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shard-size", type=int, default=128)
    k = sub.add_parser("pack", help="pack an image folder into shards")
    k.add_argument("--src", required=True)
    k.add_argument("--out", required=True, help="shard pattern, e.g. out/train-%%06d.tar")
    k.add_argument("--labels", default=None, help="JSON {relative path or stem: int label | caption | dict}")
    k.add_argument("--maxcount", type=int, default=10000)
    k.add_argument("--maxsize", type=float, default=1e9)
    k.add_argument("--shuffle-seed", type=int, default=0, help="order of the files in the shards (-1: sorted paths; "
                   "keep the default for class-per-folder trees such as ImageNet)")
    k.add_argument("--exif", action="store_true", help="store each file's camera EXIF record in its json (defocus)")
    k.add_argument("--image-format", choices=("jpg", "png"), default="jpg", help="key every image is stored under: "
                   "jpg (JPEG bytes kept, other formats encoded at quality 95) or png (lossless)")
    k.add_argument("--overwrite", action="store_true", help="replace shards that already match --out (else refused)")
    k.add_argument("--allow-unlabelled", action="store_true", help="pack images missing from --labels without a "
                   "label (else refused, listing them)")
    i = sub.add_parser("inspect", help="count samples and keys per shard")
    i.add_argument("shards")
    r = sub.add_parser("refstats", help="Inception statistics (.npz) of a dataset for FID")
    r.add_argument("--source", required=True, help="shard pattern or image folder")
    r.add_argument("--out", required=True)
    r.add_argument("--inception", default=None, help="local Inception weights file (else $FID_INCEPTION_WEIGHTS)")
    r.add_argument("--batch-size", type=int, default=50)
    r.add_argument("--image-key", default="jpg")
    t = sub.add_parser("tokenize", help="ECM: add per-scale VQ codes (vq.npy) to image shards")
    t.add_argument("--shards", required=True)
    t.add_argument("--out", required=True, help="output shard pattern, e.g. out/train-%%06d.tar")
    t.add_argument("--config", required=True, help="a VQVAEModule/ECM config naming the VQVAE")
    t.add_argument("--ckpt", default=None, help="VQVAEModule checkpoint (else the config's vae weights)")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--mid-reso", type=float, default=1.125, help="shorter side → mid-reso × size before the centre "
                   "crop, as the ECM loader (VAR: 1.125); 1 for shards already cropped to the size")
    t.add_argument("--crops-per-image", type=int, default=1, help="stored crops per sample: the centre crop plus "
                   "N-1 random ones (c1.*, c2.*), one picked per epoch in pre-tokenised training")
    p.tool_parsers = sub.choices  # name → parser, for the usage lines
    return p


def usage_lines() -> list[str]:
    """One ``ctrlgen data <tool> ...`` usage line per tool (for ``ctrlgen --help``)."""
    return [" ".join(t.format_usage().split()).removeprefix("usage: ") for t in parser().tool_parsers.values()]


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    if args.tool == "synth":
        from ctrlgen.datamodules.synth import synth

        out = synth(args.world, args.out, args.n_train, args.n_val, args.n_test, args.size, args.seed, args.shard_size)
        for split, paths in out.items():
            print(f"{split}: {len(paths)} shards in {args.out}")
    elif args.tool == "pack":
        from ctrlgen.datamodules.pack import pack_folder
        from ctrlgen.lightning_modules.defocus.exif import camera_record

        rep = pack_folder(args.src, args.out, args.labels, args.maxcount, args.maxsize,
                          shuffle_seed=None if args.shuffle_seed < 0 else args.shuffle_seed,
                          metadata=camera_record if args.exif else None,
                          image_format=args.image_format, overwrite=args.overwrite,
                          allow_unlabelled=args.allow_unlabelled)
        if rep["replaced"]:
            print(f"--overwrite: removed {len(rep['replaced'])} earlier shard(s) matching {args.out}")
        print(f"packed {rep['written']} images ({args.image_format}) into {len(rep['shards'])} shards; skipped "
              f"{rep['skipped']} unreadable")
        for rel, why in rep["skipped_files"]:
            print(f"  skipped {rel}: {why}")
    elif args.tool == "inspect":
        from ctrlgen.datamodules.shards import inspect_shards

        print(json.dumps(inspect_shards(args.shards), indent=1))
    elif args.tool == "refstats":
        from ctrlgen.lightning_modules.metrics.refstats import refstats_cli

        refstats_cli(args.source, args.out, args.inception, args.batch_size, args.image_key)
    elif args.tool == "tokenize":
        from ctrlgen.lightning_modules.apps.tokenize import tokenize_cli

        tokenize_cli(args.shards, args.out, args.config, args.ckpt, args.batch_size, mid_reso=args.mid_reso,
                     crops_per_image=args.crops_per_image)

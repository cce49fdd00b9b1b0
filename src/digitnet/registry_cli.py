"""`digitnet models list|show|best|remove|comment|tag`: the model registry from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from digitnet.atomic import write_atomically
from digitnet.errors import DigitnetError
from digitnet.registry import DEFAULT_URL, ModelRecord, Registry, number_or_none


def _format_metric(value) -> str:
    number = number_or_none(value)
    return "-" if number is None else f"{number:.4f}" if abs(number) < 100 else f"{number:.0f}"


def _tested(record: ModelRecord) -> str:
    """How many test images the test metrics are over: '10000', '5000 of 10000', or '-' when unknown."""
    images, split = record.test_images
    if images is None:
        return "partial" if record.partial_test else "-"
    return f"{images} of {split}" if record.partial_test else str(images)


def _print_table(records: list[ModelRecord], metrics: list[str]) -> None:
    header = ["id", "created", "dataset", "model", "params", *metrics, "test/images", "tags", "comment"]
    rows = [
        [
            r.id[:8],
            r.created.astimezone().strftime("%Y-%m-%d %H:%M"),
            r.dataset,
            r.model,
            str(r.params or "-"),
            *(_format_metric(r.metrics.get(m)) for m in metrics),
            _tested(r),
            ",".join(r.tags),
            r.comment,
        ]
        for r in records
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _show(record: ModelRecord, with_config: bool) -> None:
    fields = {
        "id": record.id,
        "created": record.created.astimezone().isoformat(timespec="seconds"),
        "dataset": record.dataset,
        "model": record.model,
        "params": record.params,
        "run_dir": record.run_dir,
        "checkpoint": record.checkpoint,
        "onnx_path": record.onnx_path,
        "onnx_bytes": len(record.onnx) if record.onnx else None,
        "ckpt_bytes": record.ckpt_bytes,
        "git_commit": record.git_commit,
        "test_images": _tested(record) + ("; `best` skips it without --include-partial" if record.partial_test else ""),
        "tags": ", ".join(record.tags),
        "comment": record.comment,
    }
    for key, value in fields.items():
        print(f"{key:11s} {'-' if value in (None, '') else value}")
    print("metrics:")
    for key, value in sorted(record.metrics.items()):
        print(f"  {key:22s} {value}")
    if with_config:
        print("config:")
        print(json.dumps(record.config, indent=2))


def _write_blob(data: bytes | None, path: Path, missing: str) -> None:
    if not data:
        raise DigitnetError(missing)
    write_atomically(path, lambda tmp: tmp.write_bytes(data))
    print(f"wrote {path} ({len(data)} bytes)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="digitnet models", description="List, rank and manage recorded models.")
    parser.add_argument("--db", help=f"SQLAlchemy URL (default: env DIGITNET_REGISTRY or {DEFAULT_URL})")
    sub = parser.add_subparsers(dest="action", required=True, metavar="action")

    listing = sub.add_parser("list", help="recorded models, newest first")
    listing.add_argument("--dataset", help="only this dataset (mnist, fashion)")
    listing.add_argument("--model", help="only this backbone (mlp, cnn, resnet, convnext)")
    listing.add_argument("--tag", help="only models with this tag")
    listing.add_argument("--sort", metavar="METRIC", help="order by this metric, e.g. test/acc")
    listing.add_argument("--asc", action="store_true", help="ascending order (for losses)")
    listing.add_argument("--metrics", default="test/acc,val/acc_best,test/loss", help="comma-separated columns")
    listing.add_argument("-n", "--limit", type=int, help="show at most this many")

    show = sub.add_parser("show", help="one model in full")
    show.add_argument("id", help="model id or a unique prefix of it")
    show.add_argument("--config", action="store_true", help="also print the full training config")
    show.add_argument("--onnx-out", type=Path, help="write the stored ONNX bytes to this file")
    show.add_argument("--ckpt-out", type=Path, help="write the stored checkpoint to this file")

    best = sub.add_parser("best", help="the best model by a metric")
    best.add_argument("--metric", default="test/acc", help="any recorded metric (default test/acc)")
    best.add_argument("--min", action="store_true", help="lowest value wins (for losses)")
    best.add_argument("--dataset")
    best.add_argument("--model")
    best.add_argument("--tag")
    best.add_argument(
        "--include-partial",
        action="store_true",
        help="also rank models tested on part of the test split only (trainer.limit_test_batches)",
    )
    best.add_argument("--id-only", action="store_true", help="print only the id (for scripts)")

    remove = sub.add_parser("remove", help="delete records (files on disk stay)")
    remove.add_argument("ids", nargs="+")

    comment = sub.add_parser("comment", help="set a model's free-text comment")
    comment.add_argument("id")
    comment.add_argument("text")

    tag = sub.add_parser("tag", help="add (or --remove) tags")
    tag.add_argument("id")
    tag.add_argument("tags", nargs="+")
    tag.add_argument("--remove", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with Registry(args.db) as registry:
        if args.action == "list":
            records = registry.list(args.dataset, args.model, args.tag, args.sort, not args.asc)
            if not records:
                print(
                    f"no models recorded in {registry.shown_url} (matching these filters); "
                    "every finished `python train.py` run adds one"
                )
                return 0
            _print_table(records[: args.limit], [m for m in args.metrics.split(",") if m])
        elif args.action == "show":
            record = registry.get(args.id, with_onnx=True, with_ckpt=bool(args.ckpt_out))
            if args.onnx_out:
                _write_blob(
                    record.onnx,
                    args.onnx_out,
                    f"model {record.id[:8]} has no ONNX bytes stored (its run wrote no model.onnx)",
                )
            if args.ckpt_out:
                _write_blob(
                    record.ckpt,
                    args.ckpt_out,
                    f"model {record.id[:8]} has no checkpoint stored "
                    "(recorded with registry.store_checkpoint=false or by an older digitnet)",
                )
            if not (args.onnx_out or args.ckpt_out):
                _show(record, args.config)
        elif args.action == "best":
            record = registry.best(
                args.metric,
                "min" if args.min else "max",
                args.include_partial,
                dataset=args.dataset,
                model=args.model,
                tag=args.tag,
            )
            if args.id_only:
                print(record.id)
            else:
                _print_table([record], [args.metric])
        elif args.action == "remove":
            records = [registry.get(i) for i in args.ids]  # all ids must exist before anything is deleted
            for record in records:
                registry.remove(record.id)
                print(f"removed {record.id} ({record.dataset}/{record.model})")
        elif args.action == "comment":
            print(f"{registry.set_comment(args.id, args.text).id[:8]}: {args.text}")
        elif args.action == "tag":
            record = registry.tag(args.id, remove=args.tags) if args.remove else registry.tag(args.id, add=args.tags)
            print(f"{record.id[:8]} tags: {', '.join(record.tags) or '-'}")
    return 0

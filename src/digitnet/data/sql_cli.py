"""`digitnet data push|push-unlabelled|info`: datasets into and out of a SQL data store (`digitnet.data.sql`)."""

from __future__ import annotations

import argparse
import time

from digitnet.data.idx import DATASETS, load_split
from digitnet.data.prepare import BACKGROUNDS
from digitnet.data.sql import UNLABELLED, Store
from digitnet.errors import DigitnetError


def _push(store: Store, splits: dict, quiet: bool) -> None:
    start = time.perf_counter()
    rows = store.push(splits, progress=not quiet)
    seconds = time.perf_counter() - start
    shown = ", ".join(f"{split} {len(images)}" for split, (images, _) in splits.items())
    print(f"pushed {rows} rows ({shown}) into {store.where} in {seconds:.1f} s ({rows / seconds:.0f} rows/s)")


def _push_dataset(args: argparse.Namespace) -> None:
    class_names = args.class_names.split(",") if args.class_names else None
    with Store(args.url, args.table or args.dataset, create=True) as store:
        splits = {s: load_split(args.dataset, s, args.root, class_names=class_names) for s in ("train", "test")}
        _push(store, splits, args.quiet)


def _push_unlabelled(args: argparse.Namespace) -> None:
    from digitnet.predict import expand, load_inputs

    inputs = load_inputs(expand(args.inputs), args.background)
    if inputs.errors:  # all or nothing: a half-pushed folder would be predicted in part
        raise DigitnetError(f"{len(inputs.errors)} input(s) unreadable, nothing pushed; the first: {inputs.errors[0]}")
    with Store(args.url, args.table, create=True) as store:
        _push(store, {UNLABELLED: (inputs.images, None)}, args.quiet)


def _info(args: argparse.Namespace) -> None:
    with Store(args.url, args.table) as store:
        counts = store.counts()
    print(f"{store.where}:")
    for split, (rows, labelled) in sorted(counts.items()):
        print(f"  {split:8s} {rows:7d} rows, {labelled} labelled")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="digitnet data", description="Keep datasets in a SQL database.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="action")

    def command(name: str, help: str, table_help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--url", required=True, help="SQLAlchemy URL, e.g. sqlite:///digits.db or postgresql://...")
        p.add_argument("--table", required=name != "push", help=table_help)
        return p

    push = command(
        "push",
        "write a dataset's train and test splits (replacing them if present)",
        "table to write (default: the dataset's name)",
    )
    push.add_argument("dataset", choices=DATASETS, help="the files to read: mnist, fashion or custom (images)")
    push.add_argument("--root", help="dataset root (default: $DIGITNET_DATA or data/)")
    push.add_argument("--class-names", help="custom: comma-separated label folders in class order (default: 0..9)")
    push.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    unlabelled = command(
        "push-unlabelled", f"write images without labels as split {UNLABELLED!r} (replacing it)", "table to write"
    )
    unlabelled.add_argument("inputs", nargs="+", help="image files, folders of images, IDX or .npy files")
    unlabelled.add_argument(
        "--background",
        choices=BACKGROUNDS,
        default="auto",
        help="image background: light, dark (like MNIST) or auto-detect (default)",
    )
    unlabelled.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    command("info", "rows per split of a table", "table to describe")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    {"push": _push_dataset, "push-unlabelled": _push_unlabelled, "info": _info}[args.action](args)
    return 0

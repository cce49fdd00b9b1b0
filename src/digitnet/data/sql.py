"""Datasets in a SQL database (SQLAlchemy: SQLite, PostgreSQL or any URL), one table per dataset.

A table holds rows (split, id, label, pixels): split is "train", "test" or "predict" (unlabelled
inputs), id numbers the rows of a split in their original order, label is the class index (null
for unlabelled rows) and pixels are the 784 bytes of a 28x28 uint8 image, row by row.
`digitnet data push` writes tables (`digitnet.data.sql_cli`); `SqlDataModule` (config `data=sql`)
trains from them. Every write is one transaction that replaces the splits it writes, so a push
is all or nothing and pushing twice leaves the same rows.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import sqlalchemy as sa
import torch
from sqlalchemy import exc
from tqdm import tqdm

from digitnet.data.datamodule import DigitDataModule
from digitnet.errors import DigitnetError
from digitnet.registry import sqlite_engine, sqlite_file

PIXELS = 28 * 28
UNLABELLED = "predict"  # the split of rows pushed without labels
BATCH_ROWS = 10_000  # rows per executemany / COPY chunk (and progress bar step)


def table_of(name: str, metadata: sa.MetaData | None = None) -> sa.Table:
    return sa.Table(
        name,
        metadata or sa.MetaData(),
        sa.Column("split", sa.String(16), primary_key=True),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("label", sa.Integer, nullable=True),
        sa.Column("pixels", sa.LargeBinary, nullable=False),
    )


def predictions_table_of(name: str) -> sa.Table:
    """One row per (input row, model): re-running a model replaces its rows."""
    return sa.Table(
        name,
        sa.MetaData(),
        sa.Column("input_split", sa.String(16), primary_key=True),
        sa.Column("input_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("model_id", sa.String(512), primary_key=True),
        sa.Column("predicted", sa.Integer, nullable=False),  # class index
        sa.Column("class_name", sa.String(128), nullable=False),
        sa.Column("confidence", sa.Float, nullable=False),
        sa.Column("probabilities", sa.JSON, nullable=False),  # one per class, in class order
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
    )


@dataclass
class Rows:
    """Rows of a table: their splits and ids, images uint8 [N,28,28], labels int64 [N] (None: unlabelled)."""

    splits: list[str]
    ids: torch.Tensor
    images: torch.Tensor
    labels: torch.Tensor | None


class Store:
    """One table of one database. `create=True` (pushing) makes a missing SQLite file and the table;
    reading never creates anything. Use as a context manager to release connections."""

    def __init__(self, url: str, table: str, create: bool = False):
        try:
            parsed = sa.engine.make_url(url)
        except exc.ArgumentError:
            raise DigitnetError(f"data url {url!r} is not a SQLAlchemy URL (e.g. sqlite:///digits.db)") from None
        if sqlite_file(parsed):
            path = Path(parsed.database).expanduser().absolute()
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
            elif not path.is_file():
                raise DigitnetError(
                    f"no database at {url}: the file does not exist; "
                    f"create it with `digitnet data push mnist --url {url} --table {table}`"
                )
            parsed = parsed.set(database=str(path))
        self.url, self.shown_url = parsed.render_as_string(hide_password=False), parsed.render_as_string()
        self.table = table_of(table)
        try:
            self.engine = (
                sqlite_engine(self.url) if parsed.get_backend_name() == "sqlite" else sa.create_engine(self.url)
            )
        except (exc.ArgumentError, exc.NoSuchModuleError, ImportError) as err:
            raise DigitnetError(f"cannot open database {self.shown_url}: {err}") from None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info) -> None:
        self.engine.dispose()

    @property
    def where(self) -> str:
        return f"table {self.table.name!r} at {self.shown_url}"

    @contextmanager
    def transaction(self) -> Iterator[sa.Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        # unreachable server, wrong password, locked file, not a database... (COPY raises the driver's own errors)
        except (exc.DBAPIError, self.engine.dialect.loaded_dbapi.Error) as err:
            orig = getattr(err, "orig", None) or err
            reason = str(orig).strip().splitlines()[0]
            if isinstance(orig, self.engine.dialect.loaded_dbapi.OperationalError):  # not a rule the data broke
                reason += "; check the URL and that the database is running"
            raise DigitnetError(f"{self.where}: {reason}") from None

    def check_table(self, conn: sa.Connection, table: sa.Table | None = None) -> None:
        """The data table (or `table`) exists and has exactly its columns."""
        table = self.table if table is None else table
        where = f"table {table.name!r} at {self.shown_url}"
        inspector = sa.inspect(conn)
        if not inspector.has_table(table.name):
            raise DigitnetError(f"no {where}; push one with `digitnet data push mnist --url URL --table {table.name}`")
        found = sorted(c["name"] for c in inspector.get_columns(table.name))
        if found != sorted(table.c.keys()):
            raise DigitnetError(
                f"{where} has columns {found}, not {sorted(table.c.keys())}: it is not one of "
                "digitnet's tables; choose another table name"
            )

    # ------------------------------------------------------------------ writing

    def push(self, splits: dict[str, tuple[torch.Tensor, torch.Tensor | None]], progress: bool = True) -> int:
        """Replace the given splits ({split: (images uint8 [N,28,28], labels [N] or None)}) in one transaction."""
        for split, (images, labels) in splits.items():
            if len(images) == 0:
                raise DigitnetError(f"nothing to push into split {split!r} of {self.where}: no images")
            if tuple(images.shape[1:]) != (28, 28) or (labels is not None and len(labels) != len(images)):
                raise DigitnetError(
                    f"split {split!r}: images {tuple(images.shape)} with "
                    f"{None if labels is None else len(labels)} labels; expected [N,28,28] and N labels"
                )
        with self.transaction() as conn:
            self.table.create(conn, checkfirst=True)
            self.check_table(conn)
            for split, (images, labels) in splits.items():
                conn.execute(self.table.delete().where(self.table.c.split == split))
                self._insert(conn, split, images, labels, progress)
        return sum(len(images) for images, _ in splits.values())

    def _insert(
        self, conn: sa.Connection, split: str, images: torch.Tensor, labels: torch.Tensor | None, progress: bool
    ) -> None:
        pixels = images.reshape(len(images), PIXELS).numpy()
        label_list = [None] * len(images) if labels is None else labels.tolist()
        copy = conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg2"
        with tqdm(
            total=len(images),
            desc=f"{self.table.name}/{split}",
            unit=" rows",
            file=sys.stderr,
            disable=not progress,
            leave=False,
        ) as bar:
            for start in range(0, len(images), BATCH_ROWS):
                stop = min(start + BATCH_ROWS, len(images))
                if copy:
                    self._copy(conn, split, start, pixels[start:stop], label_list[start:stop])
                else:
                    conn.execute(
                        self.table.insert(),
                        [
                            {"split": split, "id": i, "label": label_list[i], "pixels": pixels[i].tobytes()}
                            for i in range(start, stop)
                        ],
                    )
                bar.update(stop - start)

    def _copy(self, conn: sa.Connection, split: str, first_id: int, pixels: np.ndarray, labels: list) -> None:
        """PostgreSQL's COPY in its text format (bytea as \\x hex, null as \\N), in this transaction."""
        lines = io.StringIO()
        for i, (row, label) in enumerate(zip(pixels, labels)):
            shown = r"\N" if label is None else label
            lines.write(f"{split}\t{first_id + i}\t{shown}\t\\\\x{row.tobytes().hex()}\n")
        lines.seek(0)
        table = conn.dialect.identifier_preparer.format_table(self.table)
        with conn.connection.dbapi_connection.cursor() as cursor:
            cursor.copy_expert(f"COPY {table} (split, id, label, pixels) FROM STDIN", lines)

    # ------------------------------------------------------------------ reading

    def counts(self) -> dict[str, tuple[int, int]]:
        """{split: (rows, labelled rows)}."""
        with self.transaction() as conn:
            self.check_table(conn)
            query = sa.select(self.table.c.split, sa.func.count(), sa.func.count(self.table.c.label)).group_by(
                self.table.c.split
            )
            return {split: (rows, labelled) for split, rows, labelled in conn.execute(query)}

    def read(self, split: str | None = None, labelled: bool = True) -> Rows:
        """The rows of `split` in id order (`labelled`: every row must have a label), or with
        `split=None` every unlabelled row. An empty selection is an error."""
        t = self.table
        query = sa.select(t.c.split, t.c.id, t.c.label, t.c.pixels).order_by(t.c.split, t.c.id)
        query = query.where(t.c.split == split) if split is not None else query.where(t.c.label.is_(None))
        with self.transaction() as conn:
            self.check_table(conn)
            rows = conn.execute(query).all()
        splits, ids, labels, blobs = (tuple(column) for column in zip(*rows)) if rows else ((), (), (), ())
        return self._rows(split, splits, ids, labels, blobs, labelled)

    def _rows(self, split: str | None, splits: tuple, ids: tuple, labels: tuple, blobs: tuple, labelled: bool) -> Rows:
        what = f"split {split!r}" if split else "unlabelled rows"
        if not ids:
            raise DigitnetError(f"{self.where} has no {what}; push them with `digitnet data push`")
        bad = next((i for i, blob in zip(ids, blobs) if len(blob) != PIXELS), None)
        if bad is not None:
            raise DigitnetError(
                f"{self.where}: {what} row id={bad} holds {len(blobs[ids.index(bad)])} pixel bytes, "
                f"not {PIXELS}; push the data again"
            )
        if labelled and None in labels:
            raise DigitnetError(
                f"{self.where}: {what} row id={ids[labels.index(None)]} has no label; "
                "training needs every train and test row labelled"
            )
        images = torch.from_numpy(np.frombuffer(b"".join(blobs), np.uint8).reshape(-1, 28, 28).copy())
        return Rows(list(splits), torch.tensor(ids), images, torch.tensor(labels) if labelled else None)

    def write_predictions(
        self, table: str, rows: Rows, model_id: str, probs: torch.Tensor, class_names: list[str], progress: bool = True
    ) -> sa.Table:
        """Replace `model_id`'s predictions for the splits of `rows` by these, in one transaction."""
        predictions = predictions_table_of(table)
        confidence, predicted = probs.max(1)
        created = datetime.now(timezone.utc)
        values = [
            {
                "input_split": split,
                "input_id": i,
                "model_id": model_id,
                "predicted": k,
                "class_name": class_names[k],
                "confidence": c,
                "probabilities": p,
                "created": created,
            }
            for split, i, k, c, p in zip(
                rows.splits, rows.ids.tolist(), predicted.tolist(), confidence.tolist(), probs.tolist()
            )
        ]
        with self.transaction() as conn:
            predictions.create(conn, checkfirst=True)
            self.check_table(conn, predictions)
            conn.execute(
                predictions.delete().where(
                    predictions.c.model_id == model_id, predictions.c.input_split.in_(set(rows.splits))
                )
            )
            with tqdm(
                total=len(values), desc=table, unit=" rows", file=sys.stderr, disable=not progress, leave=False
            ) as bar:
                for start in range(0, len(values), BATCH_ROWS):
                    conn.execute(predictions.insert(), values[start : start + BATCH_ROWS])
                    bar.update(len(values[start : start + BATCH_ROWS]))
        return predictions


class SqlDataModule(DigitDataModule):
    """`data=sql`: the train and test splits of a pushed table instead of files; the rest (the
    seeded stratified validation split, batches of uint8 tensors) is `DigitDataModule`'s, so the
    same rows give the same run as the files they were pushed from."""

    def __init__(self, url: str, table: str, **kwargs):
        super().__init__(**kwargs)
        self.url, self.table = url, table

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        with Store(self.url, self.table) as store:
            rows = store.read(split)
        if int(rows.labels.max()) >= len(self.class_names) or int(rows.labels.min()) < 0:
            raise DigitnetError(
                f"{store.where}: split {split!r} has labels outside 0..{len(self.class_names) - 1} "
                f"(data.class_names lists {len(self.class_names)} classes)"
            )
        return rows.images, rows.labels

    def prepare_data(self) -> None:
        with Store(self.url, self.table) as store, store.transaction() as conn:
            store.check_table(conn)  # a wrong URL or table fails before the model is built

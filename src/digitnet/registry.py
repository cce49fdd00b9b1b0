"""A SQL registry of trained models (SQLAlchemy Core): record runs, find the best, fetch the ONNX bytes.

Every finished `python train.py` run adds one record (see `record_run`); `digitnet models ...`
lists, shows, ranks, comments, tags and removes them. The default database is the SQLite file
`outputs/registry.db`; any SQLAlchemy URL works (config `registry.url` or `--db`, else env
`DIGITNET_REGISTRY`); the `digitnet models` command is in `digitnet.registry_cli`.
Writes are single short transactions, so parallel sweep workers lose nothing (SQLite: WAL
journal, a long busy timeout and BEGIN IMMEDIATE, which queues writers instead of failing them).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import exc

from digitnet.atomic import unwritable
from digitnet.errors import DigitnetError

DEFAULT_URL = "sqlite:///outputs/registry.db"
SQLITE_BUSY_SECONDS = 60  # sweep workers wait this long for each other's writes

_metadata = sa.MetaData()
MODELS = sa.Table(
    "digitnet_models",
    _metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("created", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("dataset", sa.String(64), nullable=False, index=True),
    sa.Column("model", sa.String(64), nullable=False, index=True),
    sa.Column("config", sa.JSON, nullable=False),
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("params", sa.BigInteger),
    sa.Column("run_dir", sa.Text),
    sa.Column("checkpoint", sa.Text),
    sa.Column("onnx_path", sa.Text),
    sa.Column("onnx", sa.LargeBinary),
    # the checkpoint file's bytes (weights, optimizer and loop state): resume, fine-tune and export
    # without outputs/; null when recorded with registry.store_checkpoint=false or before this column
    sa.Column("ckpt", sa.LargeBinary),
    sa.Column("git_commit", sa.String(64)),
    sa.Column("comment", sa.Text, nullable=False, default=""),
    sa.Column("tags", sa.JSON, nullable=False, default=list),
)
BLOBS = ("onnx", "ckpt")  # listing a thousand models should not read a thousand models


@dataclass
class ModelRecord:
    id: str
    created: datetime
    dataset: str
    model: str
    config: dict
    metrics: dict
    params: int | None = None
    run_dir: str | None = None
    checkpoint: str | None = None
    onnx_path: str | None = None
    git_commit: str | None = None
    comment: str = ""
    tags: list[str] = field(default_factory=list)
    onnx: bytes | None = None  # only filled by Registry.get(..., with_onnx=True)
    ckpt: bytes | None = None  # only filled by Registry.get(..., with_ckpt=True)
    ckpt_bytes: int | None = None  # the size of the stored checkpoint (None: none stored)

    @property
    def test_images(self) -> tuple[int | None, int | None]:
        """How many test images the test metrics are over, and how many the test split has (None: unknown)."""
        return tuple(
            None if (n := number_or_none(self.metrics.get(key))) is None else int(n)
            for key in ("test/images", "test/split_images")
        )

    @property
    def partial_test(self) -> bool:
        """Tested on part of the test split only (trainer.limit_test_batches, e.g. sweep trials).

        Records from before test/images was recorded say nothing exact: they count as partial only
        if their config limited the test batches (1.0, the default, means all of them).
        """
        images, split = self.test_images
        if images is not None and split is not None:
            return images < split
        limit = (self.config.get("trainer") or {}).get("limit_test_batches")
        return limit is not None and not (isinstance(limit, float) and limit == 1.0)


def resolve_url(url: str | None = None) -> str:
    """`url`, else env DIGITNET_REGISTRY, else outputs/registry.db; a relative SQLite path is
    taken relative to the current directory (Hydra runs do not chdir)."""
    url = url or os.environ.get("DIGITNET_REGISTRY") or DEFAULT_URL
    try:
        parsed = sa.engine.make_url(url)
    except exc.ArgumentError:
        raise DigitnetError(f"registry url {url!r} is not a SQLAlchemy URL (e.g. {DEFAULT_URL})") from None
    if sqlite_file(parsed):
        parsed = parsed.set(database=str(Path(parsed.database).expanduser().absolute()))
    return parsed.render_as_string(hide_password=False)


def sqlite_file(url: sa.URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")


def sqlite_engine(url: str) -> sa.Engine:
    engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_SECONDS})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # let the "begin" hook below start transactions
        dbapi_connection.execute("PRAGMA journal_mode=WAL")  # readers never block the writer

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection):
        # take the write lock up front: a deferred read-then-write transaction that has to
        # upgrade its lock fails at once with "database is locked" instead of waiting
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def shown(url: str) -> str:
    """`url` without its password."""
    return sa.engine.make_url(url).render_as_string(hide_password=True)


def _engine(url: str) -> sa.Engine:
    try:
        return sqlite_engine(url) if sa.engine.make_url(url).get_backend_name() == "sqlite" else sa.create_engine(url)
    except (exc.ArgumentError, exc.NoSuchModuleError, ImportError) as err:
        raise DigitnetError(f"cannot open registry {shown(url)}: {err}") from None


@contextmanager
def _database_errors(url: str) -> Iterator[None]:
    try:
        yield
    except exc.DBAPIError as err:  # unreachable server, locked or unwritable file, not a database...
        reason = str(err.orig).splitlines()[0] if err.orig else str(err)
        raise DigitnetError(f"registry {shown(url)}: {reason}") from None


def check_recordable(url: str | None) -> None:
    """Raise DigitnetError now if `record_run` could not record into registry `url`, without creating
    anything: a missing SQLite file needs only a folder it can be made in; a database is connected to."""
    url = resolve_url(url)
    parsed = sa.engine.make_url(url)
    if sqlite_file(parsed) and not os.path.exists(parsed.database):
        blocker = unwritable(Path(parsed.database).parent)
        if blocker is not None:
            raise DigitnetError(f"cannot create {parsed.database}: {blocker} is not a folder you can write")
        return
    engine = _engine(url)
    try:
        with _database_errors(url), engine.connect() as conn:
            sa.inspect(conn).has_table(MODELS.name)
    finally:
        engine.dispose()


def git_commit() -> str | None:
    """HEAD of the git checkout the run was started in, else of the digitnet source; None outside git."""
    for where in (Path.cwd(), Path(__file__).parent):
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):  # no git installed, or a hung network drive
            return None
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return None


class Registry:
    """The models table of one database. Use as a context manager to release connections.

    Only `create=True` (training's `record_run`) makes a missing database file, its folder and the
    table; reading a registry that does not exist is an error that creates nothing.
    """

    def __init__(self, url: str | None = None, create: bool = False):
        self.url = resolve_url(url)
        engine_url = sa.engine.make_url(self.url)
        if sqlite_file(engine_url):
            if create:
                Path(engine_url.database).parent.mkdir(parents=True, exist_ok=True)
            elif not Path(engine_url.database).is_file():
                raise self._missing(engine_url.database, "the file does not exist")
        self.engine = _engine(self.url)
        if create:
            self._create_table()
        elif not self._has_table():
            self.engine.dispose()
            raise self._missing(self.shown_url, f"it has no {MODELS.name} table")
        self.columns = self._columns(create)

    def _missing(self, where: str, why: str) -> DigitnetError:
        return DigitnetError(
            f"no model in registry {where}: {why} (training runs create it where config registry.url says); "
            "point at one with --db URL or env DIGITNET_REGISTRY"
        )

    def _create_table(self) -> None:
        try:
            with self._transaction() as conn:
                _metadata.create_all(conn)
        except DigitnetError:
            # A parallel worker created the table between the existence check and CREATE TABLE.
            # (SQLite serialises both with BEGIN IMMEDIATE; server databases need a second look.)
            if not self._has_table():
                raise

    def _has_table(self) -> bool:
        with self._transaction() as conn:
            return sa.inspect(conn).has_table(MODELS.name)

    def _column_names(self) -> set[str]:
        with self._transaction() as conn:
            return {c["name"] for c in sa.inspect(conn).get_columns(MODELS.name)}

    def _columns(self, create: bool) -> set[str]:
        """The table's columns; a registry from before a column existed gets it when training writes to it."""
        found = self._column_names()
        missing = [c for c in MODELS.c if c.name not in found] if create else []
        for column in missing:
            try:
                with self._transaction() as conn:
                    kind = column.type.compile(dialect=conn.dialect)
                    conn.exec_driver_sql(f"ALTER TABLE {MODELS.name} ADD COLUMN {column.name} {kind}")
            except DigitnetError:
                if column.name not in self._column_names():  # else a parallel worker added it first
                    raise
        return self._column_names() if missing else found

    def _select(self, blobs: Sequence[str] = ()) -> list:
        """The columns to read: all but the blobs not asked for, and the stored checkpoint's size."""
        columns = [c for c in MODELS.c if c.name in self.columns and (c.name not in BLOBS or c.name in blobs)]
        if "ckpt" in self.columns:
            columns.append(sa.func.length(MODELS.c.ckpt).label("ckpt_bytes"))
        return columns

    @property
    def shown_url(self) -> str:
        return shown(self.url)

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc_info) -> None:
        self.engine.dispose()

    @contextmanager
    def _transaction(self) -> Iterator[sa.Connection]:
        with _database_errors(self.url), self.engine.begin() as conn:
            yield conn

    # ------------------------------------------------------------------ writing

    def add(self, record: ModelRecord) -> str:
        values = {c.name: getattr(record, c.name) for c in MODELS.c if c.name in self.columns}
        with self._transaction() as conn:
            conn.execute(MODELS.insert().values(**values))
        return record.id

    def remove(self, record_id: str) -> ModelRecord:
        record = self.get(record_id)
        with self._transaction() as conn:
            conn.execute(MODELS.delete().where(MODELS.c.id == record.id))
        return record

    def set_comment(self, record_id: str, comment: str) -> ModelRecord:
        record = self.get(record_id)
        with self._transaction() as conn:
            conn.execute(MODELS.update().where(MODELS.c.id == record.id).values(comment=comment))
        return self.get(record.id)

    def tag(self, record_id: str, add: Sequence[str] = (), remove: Sequence[str] = ()) -> ModelRecord:
        with self._transaction() as conn:  # read and write in one transaction: no lost concurrent tags
            record = self._get(conn, record_id)
            tags = [t for t in record.tags if t not in remove] + [t for t in add if t not in record.tags]
            conn.execute(MODELS.update().where(MODELS.c.id == record.id).values(tags=tags))
        return self.get(record.id)

    # ------------------------------------------------------------------ reading

    def get(self, record_id: str, with_onnx: bool = False, with_ckpt: bool = False) -> ModelRecord:
        """The record whose id is `record_id` or starts with it (like git's short hashes)."""
        with self._transaction() as conn:
            return self._get(conn, record_id, with_onnx, with_ckpt)

    def _get(
        self, conn: sa.Connection, record_id: str, with_onnx: bool = False, with_ckpt: bool = False
    ) -> ModelRecord:
        columns = self._select([name for name, wanted in zip(BLOBS, (with_onnx, with_ckpt)) if wanted])
        prefix = record_id.strip().lower()
        rows = conn.execute(sa.select(*columns).where(MODELS.c.id.startswith(prefix, autoescape=True)).limit(2)).all()
        if not prefix or not rows:
            raise DigitnetError(
                f"no model with id {record_id!r} in registry {self.shown_url}; `digitnet models list` shows the ids"
            )
        if len(rows) > 1:
            raise DigitnetError(f"id prefix {record_id!r} matches several models; give more characters of the id")
        return _record(rows[0])

    def list(
        self,
        dataset: str | None = None,
        model: str | None = None,
        tag: str | None = None,
        sort: str | None = None,
        descending: bool = True,
    ) -> list[ModelRecord]:
        """Records, newest first, or ordered by metric `sort` (records without it go last)."""
        query = sa.select(*self._select()).order_by(MODELS.c.created.desc())
        if dataset:
            query = query.where(MODELS.c.dataset == dataset)
        if model:
            query = query.where(MODELS.c.model == model)
        with self._transaction() as conn:
            records = [_record(row) for row in conn.execute(query)]
        if tag:
            records = [r for r in records if tag in r.tags]
        if sort:
            # metrics are a JSON column, whose SQL accessors differ per database: sort here
            ranked = [r for r in records if number_or_none(r.metrics.get(sort)) is not None]
            ranked.sort(key=lambda r: number_or_none(r.metrics[sort]), reverse=descending)
            records = ranked + [r for r in records if number_or_none(r.metrics.get(sort)) is None]
        return records

    def best(
        self, metric: str = "test/acc", mode: str = "max", include_partial: bool = False, **filters
    ) -> ModelRecord:
        """The record with the highest (`mode="max"`) or lowest (`"min"`) value of `metric`.

        Records tested on part of the test split only (`ModelRecord.partial_test`) are left out
        unless `include_partial`: their numbers are not comparable with full tests.
        """
        if mode not in ("max", "min"):
            raise DigitnetError(f"mode {mode!r} must be 'max' or 'min'")
        ranked = [
            r
            for r in self.list(sort=metric, descending=mode == "max", **filters)
            if number_or_none(r.metrics.get(metric)) is not None
        ]
        full = ranked if include_partial else [r for r in ranked if not r.partial_test]
        if not full:
            shown = ", ".join(f"{k}={v}" for k, v in filters.items() if v) or "any dataset"
            if ranked:
                raise DigitnetError(
                    f"no model in registry {self.shown_url} has metric {metric!r} ({shown}) from a whole test split: "
                    f"{len(ranked)} were tested on part of it (trainer.limit_test_batches); "
                    "--include-partial ranks them"
                )
            raise DigitnetError(
                f"no model in registry {self.shown_url} has metric {metric!r} ({shown}); "
                "train one with `python train.py` or pick another metric"
            )
        return full[0]


def _record(row: sa.Row) -> ModelRecord:
    values = row._asdict()
    if values["created"].tzinfo is None:  # SQLite keeps no time zone; we always store UTC
        values["created"] = values["created"].replace(tzinfo=timezone.utc)
    return ModelRecord(**values)


def number_or_none(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# ---------------------------------------------------------------------- recording a training run


def record_run(url: str | None, config: Mapping, metrics: Mapping, run_dir: str | Path) -> str:
    """Add a finished training run (its resolved config and metrics.json) to the registry; returns its id.

    The ONNX file's bytes are stored, and the checkpoint's too unless config registry.store_checkpoint
    is false (for models too big to keep twice)."""
    run_dir = Path(run_dir).absolute()
    checkpoint = metrics.get("best_checkpoint") or _existing(run_dir / "checkpoints" / "last.ckpt")
    onnx_path = metrics.get("onnx/path") or _existing(run_dir / "model.onnx")
    store_checkpoint = (config.get("registry") or {}).get("store_checkpoint", True)
    record = ModelRecord(
        id=str(uuid.uuid4()),
        created=datetime.now(timezone.utc),
        dataset=str(config["data"]["name"]),
        model=str(config["model"]["name"]),
        config=dict(config),
        metrics=dict(metrics),
        params=metrics.get("params"),
        run_dir=str(run_dir),
        checkpoint=str(Path(checkpoint).absolute()) if checkpoint else None,
        onnx_path=str(Path(onnx_path).absolute()) if onnx_path else None,
        onnx=Path(onnx_path).read_bytes() if onnx_path and Path(onnx_path).is_file() else None,
        ckpt=Path(checkpoint).read_bytes() if store_checkpoint and checkpoint and Path(checkpoint).is_file() else None,
        git_commit=git_commit(),
    )
    with Registry(url, create=True) as registry:
        return registry.add(record)


def _existing(path: Path) -> str | None:
    return str(path) if path.exists() else None

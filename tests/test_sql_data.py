"""The SQL data store on SQLite and PostgreSQL: `digitnet data push`, training from it, bad stores."""

from __future__ import annotations

import json
import re
import uuid

import numpy as np
import pytest
import sqlalchemy as sa
import torch
from PIL import Image

from conftest import compose_config, run_train
from digitnet import cli
from digitnet.data.idx import load_split
from digitnet.data.sql import UNLABELLED, SqlDataModule, Store
from digitnet.errors import DigitnetError
from postgres_server import BACKENDS, postgres_url  # noqa: F401 (fixture)


@pytest.fixture
def tiny(tiny_mnist, monkeypatch):
    """The synthetic 200/50-image MNIST as the dataset root (DIGITNET_DATA wins over --root)."""
    monkeypatch.setenv("DIGITNET_DATA", str(tiny_mnist))
    return tiny_mnist


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path_factory):
    """A database of each backend: a fresh SQLite file, or the session's private PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('sql') / 'digits.db'}"
    return request.getfixturevalue("postgres_url")


def _table() -> str:
    return f"t_{uuid.uuid4().hex[:10]}"  # the PostgreSQL server is shared by the whole session


def _data(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["data", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _counts(url: str, table: str) -> dict:
    with Store(url, table) as store:
        return store.counts()


def test_push_mnist_writes_all_rows_once_in_file_order(real_data, url, capsys):
    table = _table()
    for _ in range(2):  # pushing again replaces the rows instead of adding them
        code, out, err = _data(capsys, "push", "mnist", "--url", url, "--table", table, "-q")
        assert code == 0, err
        rate = re.search(r"pushed 70000 rows \(train 60000, test 10000\) into .* \((\d+) rows/s\)", out)
        assert rate, out
        print(f"\n{out.strip()}")  # the rows/s of each push (pytest -s shows it)
    assert _counts(url, table) == {"train": (60000, 60000), "test": (10000, 10000)}
    with Store(url, table) as store:
        for split in ("train", "test"):
            rows = store.read(split)
            images, labels = load_split("mnist", split)
            assert torch.equal(rows.images, images) and torch.equal(rows.labels, labels)
            assert torch.equal(rows.ids, torch.arange(len(labels)))


def test_push_custom_stores_the_prepared_folder_with_its_class_order(real_data, url, tmp_path, monkeypatch, capsys):
    from test_custom_data import _folder

    images, labels = load_split("mnist", "test")
    monkeypatch.setenv("DIGITNET_DATA", str(tmp_path))
    _folder(tmp_path, {"3": 12, "8": 12}, (images.numpy(), labels.numpy()))
    table = _table()
    code, out, err = _data(capsys, "push", "custom", "--class-names", "8,3", "--url", url, "--table", table, "-q")
    assert code == 0, err
    with Store(url, table) as store:
        for split in ("train", "test"):
            expected_images, expected_labels = load_split("custom", split, class_names=["8", "3"])
            rows = store.read(split)
            assert torch.equal(rows.images, expected_images) and torch.equal(rows.labels, expected_labels)
    assert _counts(url, table) == {"train": (20, 20), "test": (4, 4)}


_files_result: dict = {}


def _train_acc(tmp_path, *overrides: str) -> float:
    from digitnet.train import train

    cfg = compose_config(
        "model=mlp",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=40",
        "debug=test",
        "seed=3",
        "callbacks.onnx_export=null",
        "registry.enabled=false",
        *overrides,
        output_dir=tmp_path,
    )
    train(cfg)
    return json.loads((tmp_path / "metrics.json").read_text())


@pytest.mark.slow
def test_training_from_sql_equals_training_from_the_files(real_data, url, tmp_path, capsys):
    table = _table()
    assert _data(capsys, "push", "mnist", "--url", url, "--table", table, "-q")[0] == 0
    if "files" not in _files_result:
        _files_result["files"] = _train_acc(tmp_path / "files")
    from_files = _files_result["files"]
    from_sql = _train_acc(tmp_path / "sql", "data=sql", f"data.url={url}", f"data.table={table}")
    assert from_sql["test/acc"] == from_files["test/acc"] > 0.8
    assert from_sql["val/acc"] == from_files["val/acc"]  # the same validation images, drawn the same way


def test_unlabelled_rows_from_folders_idx_and_npy(url, tmp_path, capsys, real_data):
    images = load_split("mnist", "test")[0][:12].numpy()
    folder = tmp_path / "drawings"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(images[i]).resize((84, 84)).save(folder / f"d{i}.png")
    np.save(tmp_path / "more.npy", images[3:12])
    table = _table()
    code, out, err = _data(
        capsys, "push-unlabelled", str(folder), str(tmp_path / "more.npy"), "--url", url, "--table", table, "-q"
    )
    assert code == 0, err
    assert _counts(url, table) == {UNLABELLED: (12, 0)}
    with Store(url, table) as store:
        rows = store.read(None, labelled=False)
    assert rows.labels is None and rows.ids.tolist() == list(range(12))
    assert torch.equal(rows.images[3:], torch.from_numpy(images[3:12]))  # arrays are stored as they are

    (tmp_path / "broken.png").write_bytes(b"not an image")
    code, _, err = _data(
        capsys,
        "push-unlabelled",
        str(tmp_path / "broken.png"),
        str(tmp_path / "more.npy"),
        "--url",
        url,
        "--table",
        table,
        "-q",
    )
    assert code == 2 and "nothing pushed" in err and "broken.png" in err
    assert _counts(url, table) == {UNLABELLED: (12, 0)}  # the earlier push is untouched


def test_a_push_failing_half_way_leaves_the_table_as_it_was(url, tiny, capsys):
    table = _table()
    # the same columns, plus a rule the second split breaks
    with Store(url, table, create=True) as store, store.transaction() as conn:
        conn.exec_driver_sql(
            f"CREATE TABLE {table} (split VARCHAR(16) NOT NULL, id INTEGER NOT NULL, "
            "label INTEGER CHECK (label < 10), pixels BYTEA NOT NULL, PRIMARY KEY (split, id))".replace(
                "BYTEA", "BYTEA" if url.startswith("postgresql") else "BLOB"
            )
        )
    assert _data(capsys, "push", "mnist", "--url", url, "--table", table, "-q")[0] == 0
    images, labels = load_split("mnist", "test")
    bad_labels = labels.clone()
    bad_labels[-1] = 10
    with Store(url, table) as store, pytest.raises(DigitnetError, match=f"table '{table}' at "):
        store.push({"train": (images, labels), "test": (images, bad_labels)}, progress=False)
    assert _counts(url, table) == {"train": (200, 200), "test": (50, 50)}  # train was not replaced either


def _module(url: str, table: str) -> SqlDataModule:
    return SqlDataModule(url=url, table=table, val_size=20)


def test_bad_stores_are_one_clear_error(url, tiny, capsys):
    table, wrong, empty = _table(), _table(), _table()
    assert _data(capsys, "push", "mnist", "--url", url, "--table", table, "-q")[0] == 0
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {wrong} (id INTEGER, image TEXT)")
        conn.execute(sa.text(f"UPDATE {table} SET pixels = :p WHERE split = 'test' AND id = 7"), {"p": bytes(1568)})
    with Store(url, empty, create=True) as store:
        store.push({"test": load_split("mnist", "test")}, progress=False)
    engine.dispose()

    with pytest.raises(DigitnetError, match="no table 'nope' at .*digitnet data push mnist --url URL --table nope"):
        _module(url, "nope").prepare_data()
    with pytest.raises(
        DigitnetError, match=rf"table '{wrong}' .* has columns \['id', 'image'\].*choose another table name"
    ):
        _module(url, wrong).setup("fit")
    with pytest.raises(DigitnetError, match=f"table '{empty}' .* has no split 'train'; push them"):
        _module(url, empty).setup("fit")
    with pytest.raises(DigitnetError, match="split 'test' row id=7 holds 1568 pixel bytes, not 784"):
        _module(url, table).setup("test")
    with pytest.raises(DigitnetError, match=r"labels outside 0\.\.1 \(data.class_names lists 2 classes\)"):
        SqlDataModule(url=url, table=table, val_size=20, class_names=["a", "b"]).setup("fit")


@pytest.mark.slow
def test_an_unreachable_database_stops_train_py_with_one_line(tmp_path):
    closed = "postgresql+psycopg2://postgres@127.0.0.1:9/none"  # the discard port: nothing listens
    result = run_train("data=sql", f"data.url={closed}", "model=mlp", run_dir=tmp_path / "run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]  # after Lightning's own notes about the trainer
    assert line.startswith("error: table 'mnist' at postgresql+psycopg2://postgres@127.0.0.1:9/none: ")
    assert line.endswith("check the URL and that the database is running")


def test_data_command_errors(tmp_path, capsys):
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    code, out, err = _data(capsys, "info", "--url", missing, "--table", "mnist")
    assert code == 2 and out == "" and err.startswith(f"error: no database at {missing}")
    assert not (tmp_path / "none.db").exists()  # reading creates nothing
    code, _, err = _data(capsys, "push", "mnist", "--url", "nonsense", "-q")
    assert code == 2 and err == "error: data url 'nonsense' is not a SQLAlchemy URL (e.g. sqlite:///digits.db)\n"


# ---------------------------------------------------------------------------- predictions into the database


@pytest.fixture(scope="module")
def trained(real_data, tmp_path_factory):
    from tiny_run import tiny_run

    return tiny_run(tmp_path_factory)


def _predictions(url: str, table: str) -> list[dict]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY model_id, input_id"))]
    engine.dispose()
    return rows


def test_predict_from_sql_writes_one_row_per_input_and_model(trained, url, tmp_path, capsys):
    images, labels = load_split("mnist", "test")
    np.save(tmp_path / "inbox.npy", images[:40].numpy())
    table = _table()
    assert _data(capsys, "push-unlabelled", str(tmp_path / "inbox.npy"), "--url", url, "--table", table, "-q")[0] == 0

    def predict(model: str) -> str:
        code = cli.main(["predict", model, "--db", trained.registry_url, "--from-sql", url, "--table", table, "-q"])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    out = predict(trained.record_id[:8])
    assert re.fullmatch(
        rf"wrote 40 predictions of registry model {trained.record_id[:8]} .* into table "
        rf"'{table}_predictions' at .*\n",
        out,
    )
    first = _predictions(url, f"{table}_predictions")
    predict(trained.record_id)  # the same model again: its rows are replaced, not added
    again = _predictions(url, f"{table}_predictions")
    assert len(first) == len(again) == 40 and again[0]["created"] > first[0]["created"]
    assert [r["input_id"] for r in again] == list(range(40)) and {r["input_split"] for r in again} == {UNLABELLED}
    assert {r["model_id"] for r in again} == {trained.record_id}

    from digitnet.classifier import load_classifier

    expected = load_classifier(str(trained.checkpoint)).probabilities(images[:40, None].float() / 255)
    probs = torch.tensor(
        [json.loads(r["probabilities"]) if isinstance(r["probabilities"], str) else r["probabilities"] for r in again]
    )
    assert torch.allclose(probs, expected, atol=1e-6)
    assert [r["predicted"] for r in again] == expected.argmax(1).tolist()
    assert [r["class_name"] for r in again] == [str(k) for k in expected.argmax(1).tolist()]
    assert torch.allclose(torch.tensor([r["confidence"] for r in again]), expected.max(1).values, atol=1e-6)
    assert (expected.argmax(1) == labels[:40]).float().mean() > 0.7

    predict(str(trained.onnx))  # another model adds its own rows beside the first one's
    rows = _predictions(url, f"{table}_predictions")
    assert len(rows) == 80 and {r["model_id"] for r in rows} == {trained.record_id, str(trained.onnx.resolve())}


def test_predict_from_sql_errors(trained, url, capsys):
    table = _table()
    for argv, message in (
        (["--from-sql", url], "error: --from-sql takes --table T and no input files\n"),
        (["--from-sql", url, "--table", table], f"error: no (table '{table}'|database) at "),  # a new SQLite: no file
    ):
        assert cli.main(["predict", trained.record_id, "--db", trained.registry_url, *argv]) == 2
        assert re.match(message, capsys.readouterr().err)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["predict", trained.record_id])
    assert exit_.value.code == 2 and "give inputs, or --from-sql URL --table T" in capsys.readouterr().err

"""The model registry: what a training run records, list/show/best/remove, the CLI, concurrent writers."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import lightning as L
import pytest
import sqlalchemy
from hydra.utils import instantiate
from PIL import Image

from conftest import REPO, compose_config
from digitnet import cli
from digitnet.data.idx import load_split
from digitnet.errors import DigitnetError
from digitnet.registry import ModelRecord, Registry, check_recordable, record_run
from digitnet.train import build_module
from postgres_server import BACKENDS, postgres_url  # noqa: F401 (fixture)
from tiny_run import tiny_run


@pytest.fixture(scope="module")
def trained(real_data, tmp_path_factory):
    return tiny_run(tmp_path_factory)


def _record(dataset="mnist", model="mlp", minutes=0, **metrics) -> ModelRecord:
    return ModelRecord(
        id=str(uuid.uuid4()),
        created=datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(minutes=minutes),
        dataset=dataset,
        model=model,
        config={"model": {"name": model}},
        metrics=metrics,
    )


@pytest.fixture
def registry(tmp_path):
    with Registry(f"sqlite:///{tmp_path / 'reg.db'}", create=True) as registry:
        yield registry


def test_training_run_is_recorded_with_config_metrics_paths_onnx_and_commit(trained):
    with Registry(trained.registry_url) as registry:
        record = registry.get(trained.record_id, with_onnx=True)
        assert registry.get(trained.record_id).onnx is None  # listing and showing do not load the blob
    assert (record.dataset, record.model) == ("mnist", "mlp")
    assert record.config["model"]["name"] == "mlp" and record.config["trainer"]["limit_train_batches"] == 30
    assert record.metrics["test/acc"] == trained.metrics["test/acc"] > 0.5
    assert record.test_images == (10_000, 10_000) and not record.partial_test  # the whole MNIST test split
    assert record.params == trained.metrics["params"] == 109_386
    assert Path(record.checkpoint) == trained.checkpoint and trained.checkpoint.is_file()
    assert Path(record.run_dir) == trained.run_dir
    assert Path(record.onnx_path) == trained.onnx and record.onnx == trained.onnx.read_bytes()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert record.git_commit == head and re.fullmatch(r"[0-9a-f]{40}", head)
    assert record.created.tzinfo is not None and record.comment == "" and record.tags == []


def test_list_filters_and_sorts(registry):
    a = registry.add(_record("mnist", "mlp", 0, **{"test/acc": 0.90, "test/loss": 0.3}))
    b = registry.add(_record("mnist", "cnn", 1, **{"test/acc": 0.99, "test/loss": 0.05}))
    c = registry.add(_record("fashion", "cnn", 2, **{"test/acc": 0.91, "test/loss": 0.25}))
    d = registry.add(_record("mnist", "cnn", 3))  # a run without test metrics
    assert [r.id for r in registry.list()] == [d, c, b, a]  # newest first
    assert [r.id for r in registry.list(dataset="mnist", model="cnn")] == [d, b]
    assert [r.id for r in registry.list(sort="test/acc")] == [b, c, a, d]  # records without it last
    assert [r.id for r in registry.list(sort="test/loss", descending=False)] == [b, c, a, d]


def test_best_max_and_min_with_filters(registry):
    a = registry.add(_record("mnist", "mlp", 0, **{"test/acc": 0.95, "test/loss": 0.10, "val/acc_best": 0.97}))
    b = registry.add(_record("mnist", "cnn", 1, **{"test/acc": 0.99, "test/loss": 0.12, "val/acc_best": 0.96}))
    f = registry.add(_record("fashion", "cnn", 2, **{"test/acc": 0.91, "test/loss": 0.25}))
    assert registry.best("test/acc").id == b
    assert registry.best("test/loss", "min").id == a
    assert registry.best("val/acc_best").id == a
    assert registry.best("test/acc", dataset="fashion").id == f
    assert registry.best("test/acc", model="mlp").id == a
    with pytest.raises(DigitnetError, match="no model .* has metric 'val/acc_best'.*dataset=fashion"):
        registry.best("val/acc_best", dataset="fashion")
    with pytest.raises(DigitnetError, match="'max' or 'min'"):
        registry.best("test/acc", "highest")


def _tested(images=None, split=None, limit=None, acc=0.9, minutes=0) -> ModelRecord:
    metrics = {"test/acc": acc} | ({"test/images": images, "test/split_images": split} if images else {})
    record = _record(minutes=minutes, **metrics)
    record.config["trainer"] = {"limit_test_batches": limit}
    return record


PARTIAL_CASES = {  # name: (record, tested on part of the test split only?, its `models list` test/images cell)
    "whole split": (_tested(10000.0, 10000.0, 1.0, acc=0.95), False, "10000"),
    "limited batches covering the split": (_tested(10000.0, 10000.0, 4, acc=0.951), False, "10000"),
    "5 of 10 batches": (_tested(5000.0, 10000.0, 5, acc=0.99), True, "5000 of 10000"),
    "a quarter": (_tested(2500.0, 10000.0, 0.25, acc=0.98), True, "2500 of 10000"),
    "older record, default limit": (_tested(limit=1.0, acc=0.96), False, "-"),
    "older record, 5 batches": (_tested(limit=5, acc=0.985), True, "partial"),
    "older record, one batch": (_tested(limit=1, acc=0.97), True, "partial"),
    "older record, no trainer config": (_record(**{"test/acc": 0.94}), False, "-"),
}


@pytest.mark.parametrize("name", PARTIAL_CASES)
def test_partial_tests_are_told_apart_and_listed(name, tmp_path, capsys):
    record, partial, cell = PARTIAL_CASES[name]
    assert record.partial_test == partial
    url = f"sqlite:///{tmp_path / 'reg.db'}"
    with Registry(url, create=True) as registry:
        registry.add(record)
    code, out, _ = _cli(capsys, "--db", url, "list", "--metrics", "test/acc")
    header, row = out.splitlines()
    assert code == 0 and header.split()[-4:] == ["test/acc", "test/images", "tags", "comment"]
    assert " ".join(row.split()[7:]) == cell  # after id, date, time, dataset, model, params, test/acc


def test_best_skips_partial_tests_unless_asked(registry):
    ids = {name: registry.add(record) for name, (record, *_) in PARTIAL_CASES.items()}
    assert registry.best("test/acc").id == ids["older record, default limit"]  # 0.96: the best whole-split test
    assert registry.best("test/acc", include_partial=True).id == ids["5 of 10 batches"]  # 0.99
    partial = _tested(5000.0, 10000.0, 5, acc=0.9)
    partial.dataset = "fashion"
    registry.add(partial)
    with pytest.raises(
        DigitnetError,
        match=r"no model .* metric 'test/acc' \(dataset=fashion\) from a whole test "
        r"split: 1 were tested on part of it .*--include-partial ranks them$",
    ):
        registry.best("test/acc", dataset="fashion")
    assert registry.best("test/acc", include_partial=True, dataset="fashion").id == partial.id


@pytest.mark.parametrize("limit, images", [(2, 40), (3, 50), (1.0, 50), (0.5, 20), (1, 20)])
def test_the_test_step_counts_the_images_it_tests(tiny_mnist, monkeypatch, tmp_path, limit, images):
    """50 test images in batches of 20, 20, 10: the count is exact for any limit_test_batches."""
    monkeypatch.setenv("DIGITNET_DATA", str(tiny_mnist))
    cfg = compose_config("model=mlp", "data.eval_batch_size=20", "data.val_size=20", output_dir=tmp_path)
    trainer = L.Trainer(limit_test_batches=limit, logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.test(build_module(cfg), instantiate(cfg.data), verbose=False)
    assert (metrics["test/images"], metrics["test/split_images"]) == (images, 50)


def test_get_by_prefix_comment_tag_remove(registry):
    record_id = registry.add(_record(**{"test/acc": 0.9}))
    assert registry.get(record_id[:6]).id == record_id
    assert registry.set_comment(record_id[:8], "first try").comment == "first try"
    assert registry.tag(record_id, add=["baseline", "cpu"]).tags == ["baseline", "cpu"]
    assert registry.tag(record_id, remove=["cpu"], add=["baseline"]).tags == ["baseline"]
    assert [r.id for r in registry.list(tag="baseline")] == [record_id] and registry.list(tag="cpu") == []
    registry.remove(record_id[:8])
    assert registry.list() == []
    with pytest.raises(DigitnetError, match="no model with id 'nothere'.*digitnet models list"):
        registry.get("nothere")


def test_ambiguous_prefix_is_an_error(registry):
    ids = [registry.add(_record(minutes=i)) for i in range(40)]  # 40 ids over 16 hex digits: a shared first digit
    first = next(i[0] for i in ids if sum(j[0] == i[0] for j in ids) > 1)
    with pytest.raises(DigitnetError, match="matches several models"):
        registry.get(first)


def test_bad_urls_and_files_are_clear_errors(tmp_path):
    with pytest.raises(DigitnetError, match="not a SQLAlchemy URL"):
        Registry("no-such-scheme")
    not_a_db = tmp_path / "notes.db"
    not_a_db.write_text("this is not SQLite\n" * 100)
    with pytest.raises(DigitnetError, match="registry sqlite:///.*notes.db: file is not a database"):
        Registry(f"sqlite:///{not_a_db}")


WRITER = """
import sys, time
from pathlib import Path
from digitnet.registry import record_run
url, tag, start = sys.argv[1], sys.argv[2], Path(sys.argv[3])
while not start.exists():
    time.sleep(0.005)
for i in range(25):
    record_run(url, {"data": {"name": "mnist"}, "model": {"name": "mlp"}}, {"writer": tag, "i": i}, "run")
"""


@pytest.fixture(params=BACKENDS)
def fresh_database(request, tmp_path) -> str:
    """A URL of an empty database, so concurrent writers also race to create the schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh.db'}"
    server = request.getfixturevalue("postgres_url")
    name = f"registry_{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(server, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    engine.dispose()
    return server.rsplit("/", 1)[0] + "/" + name


@pytest.mark.slow
def test_two_processes_writing_at_once_lose_nothing(tmp_path, fresh_database):
    url = fresh_database
    start = tmp_path / "go"
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, url, tag, str(start)], cwd=tmp_path, stderr=subprocess.PIPE, text=True
        )
        for tag in ("a", "b")
    ]
    start.touch()  # both are imported and waiting: release them together
    for writer in writers:
        assert writer.wait(timeout=120) == 0, writer.stderr.read()
    with Registry(url) as registry:
        records = registry.list()
    assert len(records) == len({r.id for r in records}) == 50
    for tag in ("a", "b"):
        assert sorted(r.metrics["i"] for r in records if r.metrics["writer"] == tag) == list(range(25))


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["models", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_reading_a_missing_registry_creates_nothing(fresh_database, tmp_path):
    """Only a training run's record_run makes the database and its table; readers say it is missing."""
    before = sorted(tmp_path.iterdir())
    with pytest.raises(
        DigitnetError,
        match=r"^no model in registry .*(fresh\.db: the file does not exist|"
        r": it has no digitnet_models table) .*--db",
    ):
        Registry(fresh_database)
    assert sorted(tmp_path.iterdir()) == before
    record_run(fresh_database, {"data": {"name": "mnist"}, "model": {"name": "mlp"}}, {"test/acc": 0.5}, tmp_path)
    with Registry(fresh_database) as registry:
        assert [r.metrics["test/acc"] for r in registry.list()] == [0.5]


def test_the_check_before_training_creates_nothing(fresh_database, tmp_path):
    """train.py checks registry.url before training, without making the database or its table: a run that
    fails after the check leaves no registry behind."""
    before = sorted(tmp_path.iterdir())
    check_recordable(fresh_database)
    assert sorted(tmp_path.iterdir()) == before
    with pytest.raises(DigitnetError, match="^no model in registry"):  # SQLite: no file; PostgreSQL: no table
        Registry(fresh_database)


def test_the_check_before_training_refuses_what_recording_would(tmp_path):
    not_a_db = tmp_path / "notes.db"
    not_a_db.write_text("this is not SQLite\n" * 100)
    with pytest.raises(DigitnetError, match="registry sqlite:///.*notes.db: file is not a database"):
        check_recordable(f"sqlite:///{not_a_db}")
    with pytest.raises(DigitnetError, match=f"cannot create {not_a_db}/registry.db: {not_a_db} is not a folder"):
        check_recordable(f"sqlite:///{not_a_db}/registry.db")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]


READ_COMMANDS = [
    ["models", "list"],
    ["models", "best"],
    ["models", "show", "0ac4"],
    ["models", "tag", "0ac4", "baseline"],
    ["predict", "best", "seven.png"],
    ["predict", "0ac4", "seven.png"],
]


@pytest.mark.parametrize("where", ["default", "env", "--db"])
@pytest.mark.parametrize("argv", READ_COMMANDS, ids=" ".join)
def test_commands_in_a_folder_without_registry_create_nothing(tmp_path, monkeypatch, capsys, argv, where):
    monkeypatch.chdir(tmp_path)
    Image.new("L", (28, 28)).save("seven.png")
    expected = {
        "default": tmp_path / "outputs" / "registry.db",
        "env": tmp_path / "env" / "r.db",
        "--db": tmp_path / "flag" / "r.db",
    }[where]
    monkeypatch.delenv("DIGITNET_REGISTRY")
    if where == "env":
        monkeypatch.setenv("DIGITNET_REGISTRY", "sqlite:///env/r.db")
    code = cli.main([argv[0], "--db", "sqlite:///flag/r.db", *argv[1:]] if where == "--db" else argv)
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err == (
        f"error: no model in registry {expected}: the file does not exist (training runs create it where "
        "config registry.url says); point at one with --db URL or env DIGITNET_REGISTRY\n"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["seven.png"]


def test_models_command_line(trained, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'reg.db'}"
    with Registry(url, create=True) as registry:
        low = registry.add(_record("mnist", "mlp", 0, **{"test/acc": 0.91, "test/loss": 0.30}))
        high = registry.add(_record("mnist", "cnn", 1, **{"test/acc": 0.99, "test/loss": 0.04}))
    code, out, _ = _cli(capsys, "--db", url, "list", "--sort", "test/acc")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:5] == ["id", "created", "dataset", "model", "params"]
    assert lines[1].startswith(high[:8]) and "0.9900" in lines[1] and lines[2].startswith(low[:8])
    assert _cli(capsys, "--db", url, "best", "--metric", "test/loss", "--min", "--id-only")[1].strip() == high
    _cli(capsys, "--db", url, "comment", low[:8], "needs more epochs")
    _cli(capsys, "--db", url, "tag", low[:8], "baseline")
    code, out, _ = _cli(capsys, "--db", url, "show", low[:8])
    assert code == 0 and f"id          {low}" in out and "needs more epochs" in out and "baseline" in out
    code, _, err = _cli(capsys, "--db", url, "remove", low, "nothere")
    assert (
        code == 2
        and err.strip() == f"error: no model with id 'nothere' in registry {url}; `digitnet models list` shows the ids"
    )
    with Registry(url) as registry:
        assert len(registry.list()) == 2  # an unknown id removes nothing, not even the known one
    assert "removed" in _cli(capsys, "--db", url, "remove", low)[1]
    code, _, err = _cli(capsys, "--db", url, "show", high, "--onnx-out", str(tmp_path / "m.onnx"))
    assert code == 2 and "has no ONNX bytes stored" in err and not (tmp_path / "m.onnx").exists()


def test_a_partly_tested_run_is_marked_and_ranked_only_when_asked(real_data, tmp_path, capsys):
    """A sweep-like run (trainer.limit_test_batches=2) records over how many images its test/acc is."""
    from digitnet.train import train

    url = f"sqlite:///{tmp_path / 'reg.db'}"
    train(
        compose_config(
            "model=mlp",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=5",
            "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=2",
            "debug=test",
            f"registry.url={url}",
            output_dir=tmp_path / "run",
        )
    )
    with Registry(url) as registry:
        (record,) = registry.list()
    assert record.test_images == (2000, 10000) and record.partial_test
    capsys.readouterr()  # training's own output
    code, out, _ = _cli(capsys, "--db", url, "list")
    header, row = out.splitlines()
    assert code == 0 and header.split()[5:9] == ["test/acc", "val/acc_best", "test/loss", "test/images"]
    assert row.split()[9:12] == ["2000", "of", "10000"]  # created is two words
    code, out, _ = _cli(capsys, "--db", url, "show", record.id[:8])
    assert "\ntest_images 2000 of 10000; `best` skips it without --include-partial\n" in out
    code, _, err = _cli(capsys, "--db", url, "best")
    assert code == 2 and err.endswith(
        "1 were tested on part of it (trainer.limit_test_batches); --include-partial ranks them\n"
    )
    assert _cli(capsys, "--db", url, "best", "--include-partial", "--id-only")[1] == record.id + "\n"

    digit = tmp_path / "digit.png"
    Image.fromarray(load_split("mnist", "test")[0][0].numpy()).save(digit)
    code = cli.main(["predict", "best", str(digit), "--db", url])
    assert code == 2 and "--include-partial ranks them" in capsys.readouterr().err
    code = cli.main(["predict", "best", str(digit), "--db", url, "--include-partial"])
    assert code == 0 and capsys.readouterr().out.startswith(f"{digit}  ")

"""Bad config values, data, paths and URLs give one clear line before any training, and leave nothing behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_config, run_train, write_idx
from digitnet.cli import run_task
from digitnet.errors import DigitnetError
from digitnet.train import train

FAST = (
    "data.val_size=50",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "callbacks.onnx_export.test_images=20",
)


def _label_200(split: str):
    """Damage the tiny dataset: one label of `split` ("train" or "t10k") becomes 200."""

    def damage(root: Path) -> None:
        path = root / "MNIST" / "raw" / f"{split}-labels-idx1-ubyte"
        labels = np.frombuffer(path.read_bytes()[8:], dtype=np.uint8).copy()
        labels[3] = 200
        write_idx(path, labels)

    damage.__name__ = f"label_200_in_{split}"
    return damage


def _truncate_images(root: Path) -> None:
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])


def _drawings_of_5_and_7(root: Path) -> None:
    for label in ("5", "7"):
        (root / "custom" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (40, 40), 255 * (i % 2)).save(root / "custom" / label / f"{i}.png")


def _a_file(root: Path) -> None:
    (root / "a_file").write_text("not a folder")


# (overrides, damage done to the tiny dataset or None, the text of the one `error:` line); `{tmp}` is the
# test's folder (and the tiny dataset's root). Every case would otherwise fail later (mid-training, after
# model.onnx, after the whole run) with a traceback, or be silently accepted.
CASES = [
    # data
    (["data.batch_size=0"], None, "data.batch_size=0 must be a positive integer"),
    (["data.batch_size=abc"], None, "data.batch_size=abc must be an integer"),
    (["data.class_names=[a,b,c]"], None, "the mnist train split has label 9 but data.class_names names 3 classes"),
    (["data.class_names=[a,a]"], None, "data.class_names=['a', 'a'] must be a list of at least two different names"),
    (["data.download=maybe"], None, "data.download=maybe must be true or false"),
    (["data.seed=abc"], None, "data.seed=abc must be an integer"),
    (
        ["data.val_size=200"],
        None,
        "data.val_size=200 must be between 1 and 199 (the mnist training set has 200 images)",
    ),
    (["+data.foo=1"], None, "data: DigitDataModule.__init__() got an unexpected keyword argument 'foo'"),
    ([], _label_200("train"), "the mnist train split has label 200 but data.class_names names 10 classes"),
    ([], _label_200("t10k"), "the mnist test split has label 200 but data.class_names names 10 classes"),
    ([], _truncate_images, "train-images-idx3-ubyte is truncated or corrupt"),
    (["data=custom", "data.class_names=[5,6]"], _drawings_of_5_and_7, "has folders ['7'] that are not class names"),
    # model
    (["model=mlp", "model.hidden=[0,0]"], None, "model.hidden=[0, 0] must be a list of positive integers"),
    (["model=mlp", "model.dropout=2"], None, "model.dropout=2 must be a number in [0, 1)"),
    (["model.channels=[-1,4]"], None, "model.channels=[-1, 4] must be a list of 2 positive integers"),
    (["model=resnet", "model.depths=[1,1]"], None, "model.depths=[1, 1] must be a list of 3 positive integers"),
    (["model=convnext", "model.drop_path=1"], None, "model.drop_path=1 must be a number in [0, 1)"),
    (["model=convpool", "model.depth=0"], None, "model.depth=0 must be a positive integer"),
    # optim
    (["optim.lr=-0.1"], None, "optim.lr=-0.1 must be positive"),
    (["optim.lr=3e-3x"], None, "optim.lr=3e-3x must be a number"),
    (["optim._target_=torch.optim.Foo"], None, "optim._target_=torch.optim.Foo is not an optimizer class"),
    (["optim.betas=[2,0.9]"], None, "optim: Invalid beta parameter at index 0: 2"),
    (["optim=sgd", "optim.momentum=0"], None, "optim: Nesterov momentum requires a momentum and zero dampening"),
    (["+optim.foo=1"], None, "optim: AdamW.__init__() got an unexpected keyword argument 'foo'"),
    # sched
    (["sched.pct_start=5"], None, "sched.pct_start=5 must be in (0, 1]"),
    (["sched.name=step"], None, "sched.name='step' is not one of ['cosine', 'none', 'onecycle']"),
    (
        ["+sched.gamma=0.1"],
        None,
        "bad settings for sched=onecycle: onecycle() got an unexpected keyword argument 'gamma'",
    ),
    (["sched.div_factor=0"], None, "sched.div_factor=0 must be > 0"),
    (["sched=cosine", "sched.warmup_frac=2"], None, "sched.warmup_frac=2 must be in [0, 1)"),
    # trainer
    (["trainer.max_epochs=0"], None, "trainer.max_epochs=0 must be >= 1"),
    (["trainer.max_epochs=1.5"], None, "trainer.max_epochs=1.5 must be an integer"),
    (["trainer.max_epochs=-1"], None, "trainer.max_epochs=-1 (no epoch limit) needs +trainer.max_steps=<steps>"),
    (["trainer.limit_train_batches=0"], None, "trainer.limit_train_batches=0 must be > 0"),
    (["trainer.limit_val_batches=0"], None, "trainer.limit_val_batches=0 must be > 0"),
    (["trainer.accumulate_grad_batches=0"], None, "trainer.accumulate_grad_batches=0 must be >= 1"),
    (["trainer.gradient_clip_val=-1"], None, "trainer.gradient_clip_val=-1 must be >= 0"),
    (["trainer.val_check_interval=0"], None, "trainer.val_check_interval=0 must be > 0"),
    # 150 training images in batches of 64: 2 batches per epoch (found when the data is read, before any logger)
    (
        ["trainer.val_check_interval=3"],
        None,
        "trainer.val_check_interval=3 is more than the 2 training batches of an "
        "epoch (data.batch_size=64, trainer.limit_train_batches=1.0)",
    ),
    (["trainer.precision=banana"], None, "trainer: Precision 'banana' is invalid."),
    (["trainer.devices=0"], None, "trainer: `Trainer(devices=0)` value is not a valid input using cpu accelerator."),
    (["trainer.max_time=abc"], None, "trainer: `Timer(duration='abc')` is not a valid duration."),
    (["+trainer.foo=1"], None, "trainer: Trainer.__init__() got an unexpected keyword argument 'foo'"),
    # callbacks and logger
    (
        ["callbacks.model_checkpoint.monitor=val/foo"],
        None,
        "callbacks.model_checkpoint.monitor=val/foo is not a metric",
    ),
    (["callbacks.model_checkpoint.mode=up"], None, "callbacks.model_checkpoint: `mode` can be min, max but got up"),
    (["callbacks.early_stopping.patience=-1"], None, "callbacks.early_stopping.patience=-1 must be >= 0"),
    (["callbacks.onnx_export.test_images=0"], None, "callbacks.onnx_export.test_images=0 must be >= 1"),
    (["logger=csv", "+logger.csv.foo=1"], None, "logger.csv: CSVLogger.__init__() got an unexpected keyword argument"),
    # top-level keys
    (["seed=-1"], None, "seed=-1 must be in [0, 2**32)"),
    (["seed=1.5"], None, "seed=1.5 must be an integer"),
    (["module.channels_last=yes"], None, "module.channels_last=yes must be true, false or auto"),
    (["test=maybe"], None, "test=maybe must be true or false"),
    (["optimized_metric=[]"], None, "optimized_metric=[] must be a metric name or a list of them"),
    # module
    (["module.label_smoothing=1.5"], None, "module.label_smoothing=1.5 must be in [0, 1)"),
    (["module.ema_decay=true"], None, "module.ema_decay=True must be in (0, 1) or null"),
    (["module.compile=maybe"], None, "module.compile=maybe must be true or false"),
    (["+module.dropout=0.1"], None, "module.dropout is not a training option; the options are ['channels_last',"),
    # paths and URLs
    (["init_from={tmp}"], None, "not found; pass a .ckpt file"),
    (
        ["callbacks.model_checkpoint.dirpath=/proc/digitnet/checkpoints"],
        None,
        "callbacks.model_checkpoint.dirpath=/proc/digitnet/checkpoints cannot be written: /proc is not a folder "
        "you can write; set callbacks.model_checkpoint.dirpath to one of yours",
    ),
    (
        ["callbacks.last_checkpoint.dirpath={tmp}/a_file/checkpoints"],
        _a_file,
        "callbacks.last_checkpoint.dirpath={tmp}/a_file/checkpoints cannot be written: {tmp}/a_file is not a folder",
    ),
    (
        ["logger.tensorboard.save_dir={tmp}/a_file"],
        _a_file,
        "logger.tensorboard.save_dir={tmp}/a_file cannot be written: {tmp}/a_file is not a folder you can write",
    ),
    (
        ["logger=csv", "logger.csv.save_dir=/proc/digitnet"],
        None,
        "logger.csv.save_dir=/proc/digitnet cannot be written",
    ),
    (["registry.url=foo://bar"], None, "registry.url: cannot open registry foo://bar: Can't load plugin"),
    (["registry.url=notaurl"], None, "registry.url: registry url 'notaurl' is not a SQLAlchemy URL"),
    (["registry.url=sqlite:////proc/digitnet/registry.db"], None, "registry.url: cannot create /proc/digitnet"),
    (
        ["registry.url=postgresql+psycopg2://user:secret@127.0.0.1:1/db"],
        None,
        "registry.url: registry postgresql+psycopg2://user:***@127.0.0.1:1/db: connection to server at",
    ),
]


@pytest.mark.parametrize("overrides, damage, message", CASES, ids=[" ".join(c[0]) or c[1].__name__ for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(
    tiny_mnist, tmp_path, monkeypatch, capsys, overrides, damage, message
):
    """What `python train.py <overrides>` does with the error, in-process: exit 2, one `error:` line,
    no traceback, no run folder (nothing was written: no checkpoint, no TensorBoard events) and no
    registry database (its check before training, passed by the cases found later, creates none)."""
    monkeypatch.setenv("DIGITNET_DATA", str(tiny_mnist))
    if damage is not None:
        damage(tiny_mnist)
    run_dir, registry = tmp_path / "run", tmp_path / "registry" / "registry.db"
    cfg = compose_config(
        *FAST, f"registry.url=sqlite:///{registry}", *(o.format(tmp=tmp_path) for o in overrides), output_dir=run_dir
    )
    with pytest.raises(SystemExit) as exit_:
        run_task(train, cfg)
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert message.format(tmp=tmp_path) in line, line
    assert "Traceback" not in stderr and "secret" not in stderr
    assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())
    assert not registry.parent.exists()


def test_the_table_harness_accepts_a_good_run(tiny_mnist, tmp_path, monkeypatch):
    """The control: the same settings with nothing wrong train and write their run folder; a registry
    that does not exist yet (nor its folder) is no error: the first run creates it."""
    monkeypatch.setenv("DIGITNET_DATA", str(tiny_mnist))
    registry = tmp_path / "new" / "registry.db"
    cfg = compose_config(*FAST, "model=mlp", f"registry.url=sqlite:///{registry}", output_dir=tmp_path / "run")
    assert 0 <= run_task(train, cfg) <= 1
    assert (tmp_path / "run" / "metrics.json").is_file() and registry.is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, damage, message",
    [
        (["data.batch_size=0"], None, "data.batch_size=0 must be a positive integer"),
        (["trainer.precision=banana"], None, "trainer: Precision 'banana' is invalid."),
        ([], _label_200("train"), "the mnist train split has label 200"),  # found with the TensorBoard logger built
        (["registry.url=postgresql+psycopg2://user:secret@127.0.0.1:1/db"], None, "registry.url: registry postgresql"),
        # Lightning itself would say it from inside fit, after the TensorBoard events file was written
        (["trainer.val_check_interval=3"], None, "trainer.val_check_interval=3 is more than the 2 training batches"),
        (["logger.tensorboard.save_dir={tmp}/a_file"], _a_file, "logger.tensorboard.save_dir={tmp}/a_file cannot be"),
        # Hydra adds a `+` key without complaint, and no code would read it
        (["+label_smoothing=0.1"], None, "+label_smoothing=0.1 adds a key that nothing reads; the option is module."),
        (["+lr=0.1"], None, "+lr=0.1 adds a key that nothing reads; `--cfg job` lists the config's keys"),
    ],
    ids=["validate", "trainer", "labels", "registry", "val_check_interval", "save_dir", "old_key", "added_key"],
)
def test_command_line_prints_one_line_and_removes_the_run_dir(
    tiny_mnist, tmp_path, monkeypatch, overrides, damage, message
):
    monkeypatch.setenv("DIGITNET_DATA", str(tiny_mnist))
    if damage is not None:
        damage(tiny_mnist)
    registry = tmp_path / "registry" / "registry.db"
    run = run_train(
        *FAST,
        "model=mlp",
        f"registry.url=sqlite:///{registry}",
        *(o.format(tmp=tmp_path) for o in overrides),
        run_dir=tmp_path / "run",
    )
    assert run.returncode == 2, run.stderr
    last = run.stderr.splitlines()[-1]
    assert last.startswith("error: ") and message.format(tmp=tmp_path) in last, last
    assert sum(line.startswith("error:") for line in run.stderr.splitlines()) == 1
    assert "Traceback" not in run.stderr and "secret" not in run.stderr
    assert not (tmp_path / "run").exists() and not registry.parent.exists()


@pytest.mark.slow
def test_a_run_that_failed_while_training_keeps_its_folder(tiny_mnist, tmp_path, monkeypatch):
    """Only a folder with nothing but Hydra's files is removed: here TensorBoard already has the run."""
    monkeypatch.setenv("DIGITNET_DATA", str(tiny_mnist))
    run = run_train(*FAST, "optim.lr=1e9", run_dir=tmp_path / "run")
    assert run.returncode == 2 and "error: training loss became nan" in run.stderr, run.stderr
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "run").iterdir())


def test_resuming_with_another_network_is_refused_before_training(tiny_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIGITNET_DATA", str(tiny_mnist))
    short = (*FAST, "model=mlp", "test=false", "logger=none", "callbacks.onnx_export=null")
    train(compose_config(*short, output_dir=tmp_path / "short"))
    ckpt = tmp_path / "short" / "checkpoints" / "last.ckpt"
    for change, message in [
        (
            "model.hidden=[32]",
            "does not fit this run's network: the checkpoint has model.hidden=[128, 64] (this run: [32])",
        ),
        ("data.class_names=[0,1,2,3,4,5,6,7,8,9,x]", "does not fit this run's network: the checkpoint has 10 classes"),
    ]:
        cfg = compose_config(*short, change, f"ckpt_path={ckpt}", output_dir=tmp_path / "resumed")
        with pytest.raises(SystemExit):
            run_task(train, cfg)
        stderr = capsys.readouterr().err
        assert f"error: ckpt_path={ckpt} {message}" in stderr
        assert "Traceback" not in stderr and not (tmp_path / "resumed").exists()


def test_val_size_as_large_as_the_training_set(real_data, tmp_path):
    cfg = compose_config("data.val_size=60000", "debug=fast_dev_run", "logger=none", output_dir=tmp_path)
    with pytest.raises(DigitnetError, match="data.val_size=60000 must be between 1 and 59999"):
        train(cfg)


def test_missing_data_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("DIGITNET_DATA", str(tmp_path / "empty"))
    cfg = compose_config("data.download=false", "debug=fast_dev_run", "logger=none", output_dir=tmp_path)
    with pytest.raises(DigitnetError, match=r"mnist data not found in .*empty/MNIST/raw.*DIGITNET_DATA"):
        train(cfg)


def test_checkpoint_of_another_model(real_data, tmp_path):
    cfg = compose_config(
        "model=mlp",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "test=false",
        "logger=none",
        output_dir=tmp_path / "mlp",
    )
    train(cfg)
    ckpt = tmp_path / "mlp" / "checkpoints" / "last.ckpt"
    cfg = compose_config("model=cnn", f"ckpt_path={ckpt}", "logger=none", output_dir=tmp_path / "cnn")
    with pytest.raises(
        DigitnetError, match="holds a model=mlp checkpoint but this run builds model=cnn; add model=mlp"
    ):
        train(cfg)


@pytest.mark.slow
def test_resume_with_a_longer_schedule_says_to_fine_tune_instead(tiny_mnist, tmp_path, monkeypatch):
    monkeypatch.setenv("DIGITNET_DATA", str(tiny_mnist))
    short = (
        "model=mlp",
        "data.val_size=50",
        "trainer.max_epochs=1",
        "test=false",
        "logger=none",
        "callbacks.onnx_export=null",
    )
    assert run_train(*short, run_dir=tmp_path / "short").returncode == 0
    ckpt = tmp_path / "short" / "checkpoints" / "last.ckpt"
    run = run_train(*short, "trainer.max_epochs=3", f"ckpt_path={ckpt}", run_dir=tmp_path / "longer")
    assert run.returncode == 2, run.stderr
    assert "LR schedule was planned for 2 steps but this run plans 6" in run.stderr
    assert "init_from=<checkpoint>" in run.stderr and "Traceback" not in run.stderr
    fine_tune = run_train(*short, "trainer.max_epochs=3", f"init_from={ckpt}", run_dir=tmp_path / "tuned")
    assert fine_tune.returncode == 0, fine_tune.stderr


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a checkpoint", "is not a readable PyTorch checkpoint"),
        (None, "is not a digitnet checkpoint"),  # a real torch file without digitnet hyperparameters
    ],
)
def test_unreadable_or_foreign_checkpoint(tmp_path, content, message):
    ckpt = tmp_path / "x.ckpt"
    if content is None:
        torch.save({"state_dict": {}, "epoch": 3}, ckpt)
    else:
        ckpt.write_bytes(content)
    cfg = compose_config(f"ckpt_path={ckpt}", output_dir=tmp_path)
    with pytest.raises(DigitnetError, match=message):
        train(cfg)


def test_missing_checkpoint(tmp_path):
    cfg = compose_config(f"ckpt_path={tmp_path / 'nope.ckpt'}", output_dir=tmp_path)
    with pytest.raises(DigitnetError, match="nope.ckpt not found"):
        train(cfg)


@pytest.mark.slow
def test_unknown_option_lists_the_choices(tmp_path):
    run = run_train("model=vit", run_dir=tmp_path)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "Could not find 'model/vit'" in run.stderr and "convnext" in run.stderr


def test_resume_and_fine_tune_at_once_is_refused(tmp_path):
    cfg = compose_config(f"ckpt_path={tmp_path / 'a.ckpt'}", f"init_from={tmp_path / 'b.ckpt'}", output_dir=tmp_path)
    with pytest.raises(DigitnetError, match="set either ckpt_path .* or init_from .*, not both"):
        train(cfg)

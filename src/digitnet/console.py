"""What a run prints, and its copy in the run dir's log file (`train.log`, `eval.log`).

Everything goes through `logging`, so Hydra's job logging (conf/hydra/default.yaml) sends each
line both to the console (plain messages) and to the log file (with time and source). Lightning's
own lines and Python warnings are routed there too, minus a few known messages that say nothing
about the run. Progress bars stay on the console; both get one line per epoch.
"""

from __future__ import annotations

import io
import logging
import re
import warnings

import lightning as L
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

log = logging.getLogger(__name__)
config_log = logging.getLogger(f"{__name__}.config")  # the composed config at a run's start

# Lightning messages that describe our own config choices, not the run: the default-valued
# `limit_*=1.0` settings, the model summary callback we configure on purpose, an advertisement.
LIGHTNING_NOISE = re.compile(
    r"`Trainer\((limit_\w+|val_check_interval)=1\.0\)` was configured so"
    r"|Trainer already configured with model summary callbacks"
    r"|Tip: For seamless cloud logging"
    r"|The following callbacks returned in `LightningModule.configure_callbacks` will override"
)
# A torch deprecation inside Lightning's own code, which a user cannot act on.
WARNING_NOISE = [r"`isinstance\(treespec, LeafSpec\)` is deprecated"]
# Lightning's hint for multi-node jobs, shown whenever SLURM's `srun` exists on the machine.
SRUN_HINT = r"The `srun` command is available on your system but is not used"


class ConsoleFormatter(logging.Formatter):
    """Plain messages; warnings and errors start with `warning:` / `error:`."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


class ConsoleHandler(logging.StreamHandler):
    """A stream handler that lifts progress bars out of the way of each line, then redraws them."""

    def emit(self, record: logging.LogRecord) -> None:
        with tqdm.external_write_mode(file=self.stream):
            super().emit(record)


class NotFileOnly(logging.Filter):
    """For the console handler: lets through everything but records marked `file_only`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


class _DropLightningNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not LIGHTNING_NOISE.search(record.getMessage())


class _SummaryToFile(logging.Filter):
    """A sweep trial's model summary and config go to its log file only (the console would repeat them per trial)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.file_only = True
        return True


class _OneLineWarning(logging.Filter):
    """A captured warning without the newline `warnings.formatwarning` ends it with."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = record.getMessage().rstrip(), None
        return True


_NOISE = _DropLightningNoise()
_SUMMARY_TO_FILE = _SummaryToFile()
_ONE_LINE = _OneLineWarning()


def setup(*, multi_node: bool = False, sweep_trial: bool = False) -> None:
    """Route Lightning's log and Python warnings into the job's logging, without the noise above.

    Idempotent: Hydra runs it once per job, and a sweep runs many jobs in one process.
    """
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        # Lightning gives itself a stderr handler when imported before Hydra configures logging
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)
        logger.propagate = True
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NOISE)
    logging.getLogger("lightning.fabric.utilities.rank_zero").addFilter(_NOISE)
    for per_trial in (logging.getLogger("lightning.pytorch.callbacks.model_summary"), config_log):
        (per_trial.addFilter if sweep_trial else per_trial.removeFilter)(_SUMMARY_TO_FILE)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").addFilter(_ONE_LINE)
    for message in WARNING_NOISE:
        warnings.filterwarnings("ignore", message=message)
    if not multi_node:  # the hint only matters for jobs across machines
        warnings.filterwarnings("ignore", message=SRUN_HINT)


def config_tree(cfg: DictConfig) -> str:
    """The resolved config as a tree of its groups (plain text: it also goes to the log file)."""
    from rich.console import Console
    from rich.tree import Tree

    def add(node: Tree, mapping: dict) -> Tree:
        for key, value in mapping.items():
            if isinstance(value, dict) and value:
                add(node.add(str(key)), value)
            else:
                node.add(f"{key}: {value}")
        return node

    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(add(Tree("config"), OmegaConf.to_container(cfg, resolve=True)))
    return console.file.getvalue().rstrip()


def log_error_to_file(message: str, exc_info: bool = False) -> None:
    """Record an error the console shows by other means (a printed line, Hydra's traceback)."""
    log.error(message, exc_info=exc_info, extra={"file_only": True})


def progress(iterable=None, *, desc: str, total: int | None = None, enabled: bool = True) -> tqdm:
    """A tqdm bar on stderr that disappears when done; none when `enabled` is false or stderr is
    not a terminal (a redirected console would fill with redrawn bars)."""
    return tqdm(
        iterable, desc=desc, total=total, disable=True if not enabled else None, leave=False, dynamic_ncols=True
    )


def _fmt(value: float) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def metrics_text(metrics: dict, names: list[str]) -> str:
    """`test/acc=0.9915 test/loss=0.0301` for the names present, rounded to 4 decimals."""
    return " ".join(f"{n}={_fmt(metrics[n])}" for n in names if n in metrics)


def result_line(metrics: dict, fast_dev_run: int, tested: bool) -> str:
    """The run's closing line: its rounded results, or for a smoke test, what it checked."""
    if fast_dev_run:
        stages = "train, val and test" if tested else "train and val"
        batches = "1 batch" if fast_dev_run == 1 else f"{fast_dev_run} batches"
        return f"smoke test (fast_dev_run) passed: {batches} each of {stages} ran; no model trained, no result"
    counts = ("test/images", "test/split_images")
    names = sorted(n for n in metrics if n.startswith("test/") and n not in counts) + ["val/acc_best"]
    epochs = metrics["epochs"]
    tested, split = (int(metrics.get(n, 0)) for n in counts)
    over = (
        ""
        if not tested
        else f"over {tested} test images "
        if tested == split
        else f"over {tested} of {split} test images "
    )
    return (
        f"result: {metrics_text(metrics, names)} {over}"
        f"({epochs} epoch{'' if epochs == 1 else 's'} in {metrics['train_seconds']:.0f} s of training)"
    )


class EpochLog(L.Callback):
    """One line per epoch with the epoch's metrics (a progress bar only shows the last epoch's)."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k: v.item() for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        names = sorted(n for n in metrics if n.startswith(("train/", "val/")))
        epoch = trainer.current_epoch
        of = f" ({epoch + 1} of {trainer.max_epochs})" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        log.info("epoch %d%s: %s", epoch, of, metrics_text(metrics, names))

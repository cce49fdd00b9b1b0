"""A Lightning-free stand-in for train.py: same config contract, instant "epochs".

Accuracy after each epoch follows a learning curve whose ceiling depends on x, lr and the
model, so a sweep has something to find and a pruner has bad curves to stop early.
"""

import json
import math
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from digitnet.errors import DigitnetError
from digitnet.sweep.trial_reporter import TrialReporter

PRUNING_CALLBACK = "digitnet.sweep.pruning.OptunaPruning"


def accuracy(cfg: DictConfig, epoch: int) -> float:
    ceiling = cfg.model.capacity - (cfg.x - 0.3) ** 2 - 0.05 * abs(math.log10(cfg.lr) + 2)
    return ceiling * (1 - math.exp(-(epoch + 1) / 2))


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | list[float]:
    # What OptunaPruning does inside Lightning, without importing Lightning (slow to start).
    reporters = [
        TrialReporter(**{k: v for k, v in c.items() if k != "_target_"})
        for c in cfg.callbacks.values()
        if c.get("_target_") == PRUNING_CALLBACK
    ]
    best, epochs = -math.inf, 0
    for epoch in range(cfg.epochs):
        time.sleep(cfg.seconds_per_epoch)
        if cfg.crash_above is not None and cfg.x > cfg.crash_above:
            raise {"runtime": RuntimeError, "digitnet": DigitnetError}[cfg.crash_as](f"diverged at x={cfg.x}")
        acc = accuracy(cfg, epoch)
        best, epochs = max(best, acc), epoch + 1
        epoch_metrics = {"val/acc": acc, "val/acc_best": best}
        for reporter in reporters:
            reporter.report(epoch_metrics[reporter.monitor], epoch)
    metrics = {"val/acc_best": best, "params": cfg.model.params, "epochs": epochs}
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    (out_dir / "metrics.json").write_text(json.dumps(metrics))
    if isinstance(cfg.optimized_metric, str):
        return metrics[cfg.optimized_metric]
    return [metrics[name] for name in cfg.optimized_metric]


if __name__ == "__main__":
    main()

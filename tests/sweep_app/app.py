"""A Lightning-free stand-in for train.py: same config contract, instant "epochs".

Accuracy after each epoch follows a learning curve whose ceiling depends on x, lr and the
model, so a sweep has something to find and a pruner has bad curves to stop early.
"""

import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig


def accuracy(cfg: DictConfig, epoch: int) -> float:
    ceiling = cfg.model.capacity - (cfg.x - 0.3) ** 2 - 0.05 * abs(math.log10(cfg.lr) + 2)
    return ceiling * (1 - math.exp(-(epoch + 1) / 2))


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | list[float]:
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if "_target_" in c]
    trainer = SimpleNamespace(sanity_checking=False, current_epoch=0, callback_metrics={})
    best, epochs = -math.inf, 0
    for epoch in range(cfg.epochs):
        time.sleep(cfg.seconds_per_epoch)
        if cfg.crash_above is not None and cfg.x > cfg.crash_above:
            raise RuntimeError(f"diverged at x={cfg.x}")
        acc = accuracy(cfg, epoch)
        best, epochs = max(best, acc), epoch + 1
        metrics = {"val/acc": acc, "val/acc_best": best}
        trainer.current_epoch, trainer.callback_metrics = epoch, metrics
        for callback in callbacks:
            callback.on_validation_end(trainer, None)
    metrics = {"val/acc_best": best, "params": cfg.model.params, "epochs": epochs}
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    (out_dir / "metrics.json").write_text(json.dumps(metrics))
    if isinstance(cfg.optimized_metric, str):
        return metrics[cfg.optimized_metric]
    return [metrics[name] for name in cfg.optimized_metric]


if __name__ == "__main__":
    main()

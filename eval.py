"""Evaluate a model: `python eval.py ckpt_path=<.ckpt | registry id | best>` writes report.md (see README)."""

import hydra
from omegaconf import DictConfig

from digitnet.cli import run_task
from digitnet.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig):
    return run_task(evaluate, cfg)


if __name__ == "__main__":
    main()

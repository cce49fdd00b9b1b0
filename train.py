"""Train a classifier: `python train.py model=convnext data=fashion aug=strong` (see README)."""

import hydra
from omegaconf import DictConfig

from digitnet.cli import run_task
from digitnet.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig):
    return run_task(train, cfg)


if __name__ == "__main__":
    main()

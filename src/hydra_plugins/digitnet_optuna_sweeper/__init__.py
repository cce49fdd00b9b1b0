"""digitnet's Hydra sweeper: ``hydra/sweeper=digitnet_optuna`` on Optuna >= 4 (see config.py for its keys)."""

"""digitnet's Hydra sweeper: ``hydra/sweeper=optuna`` on Optuna >= 4 (see config.py for its keys)."""

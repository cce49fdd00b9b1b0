"""Optuna sweeps: study/storage setup, the shared trial budget, pruning callback and reports.

The Hydra side (sweeper plugin, search-space syntax) lives in
``hydra_plugins.digitnet_optuna_sweeper``; nothing here imports Hydra.
"""

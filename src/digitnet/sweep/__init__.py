"""Optuna sweeps: study/storage setup, the shared trial budget, pruning callback and reports.

The Hydra side (sweeper plugin, search-space syntax) lives in
``hydra_plugins.digitnet_optuna_sweeper``; here only compat.py (the library internals the
sweeper relies on) imports Hydra.
"""

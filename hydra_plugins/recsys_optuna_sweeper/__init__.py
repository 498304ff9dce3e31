"""recsys's Optuna sweeper for Hydra: persisted, resumable, pruning, multi-objective studies."""

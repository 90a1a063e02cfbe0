"""The Optuna study around it all: settings, the run, the trial, storage, results, progress, targets."""

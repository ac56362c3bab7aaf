"""Running many folds: the run store, the one job builder, claims, executors (local, processes, Ray), the plan and
the status table."""

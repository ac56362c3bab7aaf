"""Cohorts (TCGA, synthetic, custom tables), their patient-level folds, and name resolution."""

from milbench.tasks.cohort import Cohort, load_splits_folder, load_table, resolve_cohort

__all__ = ["Cohort", "load_splits_folder", "load_table", "resolve_cohort"]

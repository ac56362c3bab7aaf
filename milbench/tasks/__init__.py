"""Cohorts (TCGA, synthetic, custom tables), their patient-level folds, audits, site-preserved folds, and name
resolution (:mod:`.cohort`)."""

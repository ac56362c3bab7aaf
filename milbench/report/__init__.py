"""Reporting: leaderboards recomputed from stored predictions (aggregation), the document model, its renderers
(markdown, LaTeX, HTML), the published figures, and plots."""

"""Cross-run reports: the comparison table (reads plain run records) and its plots."""

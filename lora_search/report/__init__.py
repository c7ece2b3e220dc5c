"""What a study found: the report, plots, importances and how far to trust them, comparisons."""

"""What the stages' reports share: statistics, plots, format diagnostics."""

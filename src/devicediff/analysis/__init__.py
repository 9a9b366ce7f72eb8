"""Analysis: pure functions from stored runs to DataFrames (statistics, divergence, plots)."""

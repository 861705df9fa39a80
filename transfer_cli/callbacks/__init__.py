"""Lightning callbacks, one job per module."""

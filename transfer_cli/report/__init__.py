"""Evaluation reports (metrics.json, per_class.csv, confusion matrix, calibration, errors) and training
curves. Importing this package is cheap: matplotlib is imported only inside the drawing functions."""

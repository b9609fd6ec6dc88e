"""Evaluation: win rates, length control, ranking accuracy, reports."""

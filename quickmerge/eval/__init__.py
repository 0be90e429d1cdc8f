"""Evaluation harnesses: data windows, methods, metrics, reports."""

"""Realistic web apps for the leak-detection field suite (see benchmarks/field_suite.py)."""

"""Workloads for benchmarks/leak_suite.py.

Each module declares ``LEAKS`` (the ground truth), a one-line ``DESCRIPTION`` and ``run(stop)``, which
serves "requests" until ``stop`` is set. Every line that allocates memory the leak keeps is marked with
a ``# LEAK-SITE`` comment; the suite reads those markers to check the reported allocation site.
"""

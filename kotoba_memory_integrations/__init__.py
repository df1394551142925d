"""Thin adapters that attach kotoba-memory to web frameworks, ORMs and metrics pipelines.

Each framework lives in its own submodule and is imported only when used, so importing this package
pulls in no framework.
"""

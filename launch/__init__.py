"""Launchers for artifex-dpo runs: a GKE JobSet renderer (:mod:`launch.gke`) and an XManager launcher.

Run them from the repository root, e.g. ``python -m launch.gke --help``.
"""

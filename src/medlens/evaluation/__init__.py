"""Evaluation: metrics (numbers first), plots and the report (pictures second).

Import the submodules directly (``medlens.evaluation.metrics``); nothing heavy is imported here.
"""

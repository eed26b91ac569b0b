"""Evaluation suites that every run, sweep and report shares (the ``eval`` config group).

A suite is a registered class (:mod:`instruct.eval.suite`); ``eval.suites`` names the ones a
run uses. Each returns per-prompt scores, so every figure gets a bootstrap interval and two
jobs can be compared prompt by prompt (:mod:`instruct.eval.stats`).
"""

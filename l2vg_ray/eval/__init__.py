"""Evaluation: mteb adapter, embedding cache, baselines, task suites, Ray fan-out, report.

Entry point: ``l2vg_ray.eval.runner.run_eval(cfg)``.
"""

"""`make eval`: the toy-world benchmark of every safety method, in one run with fixed seeds.

Split by concern: ``prompts`` (the benchmark's and the calibration's splits, over the grammar of
``toyworld.grammar``), ``baselines`` (the methods, their calibration grids and how each is sampled),
``metrics`` (the strict judge's figures, ratios to plain CFG, ROC AUC, Frechet distance, intervals),
``report`` (tables and figures) and ``run`` (the command: ``python -m toyworld.eval``). Calibration
(``toyworld.calibrate``) runs the same code on its own splits.
"""

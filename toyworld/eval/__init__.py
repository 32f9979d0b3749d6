"""`make eval`: the toy-world benchmark of every safety method, in one run with fixed seeds.

Split by concern: ``prompts`` (the splits), ``baselines`` (the methods and how each is sampled),
``metrics`` (oracle-based scores, ROC AUC, Frechet distance), ``report`` (table and figures) and
``run`` (the command: ``python -m toyworld.eval``). Calibration (``toyworld.calibrate``) runs the
same benchmark code on its own split.
"""

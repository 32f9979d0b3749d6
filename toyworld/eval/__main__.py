"""``python -m toyworld.eval``: the benchmark run (:mod:`toyworld.eval.run`)."""

from .run import main

raise SystemExit(main())

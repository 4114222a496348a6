"""opsd.workers: the Ray actors (rollout, scorer, learner) and the weight transports
(docs/DESIGN.md). Imported as ``opsd.workers``; this folder is mapped there (opsd/__init__.py)."""

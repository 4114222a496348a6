"""opsd.launch: the ``opsd`` CLI, the driver and the Ray wiring (docs/DESIGN.md). Imported as
``opsd.launch``; this folder is mapped there (opsd/__init__.py)."""

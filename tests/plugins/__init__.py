"""Plug-ins that live outside opsd, as a user's would: each is found through a registry by its
``module:attribute`` name alone (opsd/registry.py), with no change to the driver, the learner or
the actors."""

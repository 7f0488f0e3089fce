"""Trainer integrations (``r2m.integrations.trl``, ``r2m.integrations.openrlhf``).

Their code lives in the top-level ``integrations/`` folder, one package per trainer, mapped here by pyproject.toml's
``package-dir``. That folder holds no ``__init__.py``, so Python run from the repository root finds no package named
``integrations`` there to shadow an installed one. This package imports nothing: the core never imports a trainer.
"""

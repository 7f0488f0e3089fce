"""r2m's benchmarks, imported as ``r2m.benchmarks`` (``r2m bench <name>``, ``r2m demo``).

They live one level below the top-level ``benchmarks/`` folder, which holds no ``__init__.py``, so that Python run
from the repository root finds no package named ``benchmarks`` there to shadow an installed one.
"""

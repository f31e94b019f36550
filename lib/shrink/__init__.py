"""Shrink: a reproducible handbook on shrinking LLMs along weights, bits, tokens and data.

The package is thin on purpose: notebooks compose these modules.

- :mod:`shrink.models`   model registry (offline SmolLM2, Hub ids, tiny random configs), the block runner,
  key/value prefixes
- :mod:`shrink.data`     corpus registry (offline files via ``SHRINK_DATA``, ``datasets`` online) and the
  one calibration sampler
- :mod:`shrink.eval`     the one perplexity function
- :mod:`shrink.results`  JSON result records and the ``cached`` helper
- :mod:`shrink.scales`   typed presets per experiment and scale (``tiny``, ``cpu``, ``paper``)
- :mod:`shrink.notebook` the one setup call of every notebook
- :mod:`shrink.explore`  interactive explorers over result rows (widgets in JupyterLab, static figure headless)
"""

from importlib import import_module

__version__ = "0.1.0"

_SUBMODULES = ("models", "data", "eval", "results", "scales", "notebook", "plotting", "env", "errors", "probe",
               "ops", "pruning", "quant", "report", "explore", "lab")


def __getattr__(name):  # lazy: `import shrink` stays fast, `shrink.models` works without extra imports
    if name in _SUBMODULES:
        return import_module(f"shrink.{name}")
    raise AttributeError(f"module 'shrink' has no attribute {name!r}")

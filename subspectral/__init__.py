"""subspectral: spectral sub-dataset training, from corpus to ensemble.

One installed package holding the three stages and their contract::

    subspectral.schemas    the data contract between the stages (dataset card, tables, run record)
    subspectral.pipeline   prepare: corpus -> N aligned WebDataset sub-datasets
    subspectral.train      train one member per sub-dataset; train.ensemble: evaluate their ensemble
    subspectral.cli        the command line (``subspectral``, ``python -m subspectral``, ``cli.py``)

In a source checkout the stage folders sit beside this one (``pipeline/``, ``train/``, ``schemas/``
at the repository root); setuptools maps them under ``subspectral`` when the project is installed.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

# A source checkout run without installing it (``python cli.py`` with PYTHONPATH at the root, a Ray
# worker given the checkout): find the stages beside this folder. Installed, they are inside it.
_checkout = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "pipeline").is_dir() and (_checkout / "pipeline" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821 - the package's own search path


_API = ("prepare", "train_member", "ensemble_eval", "PrepareResult", "TrainResult", "EnsembleResult")


def __getattr__(name: str) -> object:
    # The API (subspectral.api) is imported on first use: `import subspectral` stays light, for Ray workers.
    if name in _API:
        from subspectral import api

        return getattr(api, name)
    raise AttributeError(f"module 'subspectral' has no attribute {name!r}")


__all__ = ["__version__", *_API]

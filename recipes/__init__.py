"""Build-time scripts of the repository (run from its root, e.g. `python recipes/train_recipes.py`); not
part of the installed package (pyproject lists its packages explicitly)."""

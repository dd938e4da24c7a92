"""jaxrecon: single-view textured mesh reconstruction in pure JAX.

Floors (imports only go down; see docs/architecture.md):
  1. geometry/, render/, ops/   pure array math, no Flax
  2. models/, losses/, data/, metrics/
  3. train.py, evaluation/
  4. main.py and other thin CLIs
"""

__version__ = "0.1.0.dev0"

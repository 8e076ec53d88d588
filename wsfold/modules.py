"""Where wsfold 0.1 kept SamePad: a whole baked model pickled to .pt by wsfold 0.1 names this module, and still
unpickles (with --allow-pickle) now that the class lives in wsfold.bake.modules."""

from .bake.modules import SamePad

__all__ = ["SamePad"]

"""The passes, one module each; importing this package registers them all."""
from . import dead_code, fold_batchnorm, fold_constants  # noqa: F401

"""The passes, one module each; importing this package registers them all."""
from . import (canonicalize, cse, dead_code, fold_batchnorm, fold_constants, fuse_activations,  # noqa: F401
               apply_calibration, bias_correction, conv_transpose_as_conv, cross_layer_equalization,
               factorize_low_rank, gptq, insert_qdq, lower_integer, range_analysis, search_ranges, smooth_quant,
               widen_float16)

# The float pipeline every compile starts with: simplify, fold, then fuse. Each pass is
# numerically neutral on float graphs.
DEFAULT_FLOAT_PIPELINE = ("canonicalize,fold-constants,canonicalize,eliminate-common-subexpressions,"
                          "fold-batchnorm,fuse-activations,eliminate-dead-code")

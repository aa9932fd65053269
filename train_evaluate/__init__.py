"""The experiment: backbone and feature cache, adapter training, Optuna sweep, results.

Importing the package asks Intel MKL (torch's BLAS on x86) for reproducible results before its
first call: ``MKL_CBWR=AUTO,STRICT`` (conditional numerical reproducibility, the code path of
this CPU, and results independent of the operands' memory alignment). Without it MKL may sum a
product in another order for unaligned operands, or split work between threads differently
from one call to the next, so one process could give two runs of the same command different
numbers. A value the user has set is kept. Measured on the AMD EPYC the figures come from:
the same results as without it for aligned operands, and no slower.
"""

import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

"""coopseg: the thin layer on top of coopseg_kernels (evaluation and the command line).

The model and training layer (segmentor, registor, losses, three-stage schedule)
is not built yet.
"""
from .evaluation import PairedTest, paired_wilcoxon

__all__ = ["PairedTest", "paired_wilcoxon"]

"""D_S, the relative similarity of two masks: max over tau in Omega of Dice(tau(s1), s2)
(definitions: docs/conventions.md#d_s-definitions).

driver.py       `relative_similarity`, `dice`, `SimilarityResult`: the public orchestration
translation.py  `translation_search`: the exact integer search, its three counters and cost model
descent.py      the coarse-to-fine preconditioned descent (pyramid, preconditioner, steps, levels)
naive.py        the brute-force translation search (the tests' oracle, the benchmarks' baseline)
_masks.py       thresholding, voxel counts, pooled Dice of bool masks

The private names the tests patch live in their modules (e.g. `translation._SHIFT_BYTES`,
`descent.similarity_step`); they are not re-exported here, where patching them would
change nothing.
"""
from . import naive
from .driver import OMEGAS, SimilarityResult, coarse_size_for, dice, relative_similarity
from .translation import SEARCH_METHODS, translation_search

__all__ = ["relative_similarity", "dice", "translation_search", "SimilarityResult", "coarse_size_for", "OMEGAS",
           "SEARCH_METHODS", "naive"]

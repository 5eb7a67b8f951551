"""Analyzers: each a function from a store's ``xarray.Dataset`` (or two) to an ``xarray.Dataset``.

They read only the store (no torch, no model, no tokenizer) and run lazily with dask::

    import headstore
    from headstore.analyze import copy_suppression, path_patch_query

    ds = headstore.open_store("ioi.zarr")
    copy_suppression(ds)["score"]                                   # (layer, head)
    path_patch_query(ds, abc, senders=[(0, 1)], receiver=(1, 2))    # positions from the store's columns

Conventions: heads are ``(layer, head)`` tuples (a set of heads a list of them, or ``"all"``); positions
are ints or one per sequence; options are keyword-only; every result has ``attrs["analyzer"]`` and
per-head variables with ``layer, head`` leading. Implementation lives in private modules, each ending with
its declaration (``registry.AnalyzerSpec``: name, function, required fields, parameter types), which
importing this package registers: ``headstore.analyze.registry.analyzers()`` lists them.
"""

from headstore.analyze._attention_attribution import attention_attribution
from headstore.analyze._attention_search import attention_search
from headstore.analyze._attention_stats import attention_stats
from headstore.analyze._attribution_patching import attribution_patching
from headstore.analyze._calibration import calibration, n_empty_bins, overconfidence
from headstore.analyze._circuits import circuits
from headstore.analyze._composition import composition
from headstore.analyze._copy_suppression import copy_suppression
from headstore.analyze._edge_attribution import edge_attribution, top_edges
from headstore.analyze._head_scores import head_scores
from headstore.analyze._head_similarity import head_similarity
from headstore.analyze._ifelse_detector import ifelse_detector
from headstore.analyze._ioi import ioi, ioi_pair
from headstore.analyze._logit_attribution import logit_attribution
from headstore.analyze._path_patch import path_patch_query
from headstore.analyze._projection_loss import projection_loss
from headstore.analyze._top_attention import top_attention
from headstore.analyze._top_effects import top_effects
from headstore.analyze.types import Relation as Relation  # attention_search's predicates (a class)

__all__ = [
    "attention_attribution",
    "attention_search",
    "attention_stats",
    "attribution_patching",
    "calibration",
    "circuits",
    "composition",
    "copy_suppression",
    "edge_attribution",
    "head_scores",
    "head_similarity",
    "ifelse_detector",
    "ioi",
    "ioi_pair",
    "logit_attribution",
    "n_empty_bins",
    "overconfidence",
    "path_patch_query",
    "projection_loss",
    "top_attention",
    "top_edges",
    "top_effects",
]

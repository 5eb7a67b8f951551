"""Attribution patching (AtP; Nanda 2023, Kramar et al. 2024 "AtP*") for every head, from a clean store with
gradients (``extract --grad METRIC``) and its corrupt twin::

    per_position[L, h, pos] = mean_b  sum_d_head (z_corrupt[b, L, pos, h] - z_clean[b, L, pos, h]) . grad_z[b, L, pos, h]
    per_sequence[L, h, b]   = sum_pos sum_d_head (z_corrupt - z_clean)[b, L, pos, h] . grad_z[b, L, pos, h]
    score[L, h]             = mean_b per_sequence[L, h, b]

``grad_z`` = dM/dz at the clean input, M the clean store's metric (``attrs["metric"]``). On the head's result
instead of z the score is the same (``dM/dz = dM/dresult @ W_O[h]^T``). It is the first-order estimate of the
change of M when the head's z is patched from the corrupt run: differentiating through every norm (nothing
frozen), as online AtP does.
"""

from __future__ import annotations

import xarray as xr

from headstore.analyze._attribution import check_pair
from headstore.analyze._maths import f32

NEEDS = ("z", "grad_z")


def attribution_patching(clean: xr.Dataset, corrupt: xr.Dataset, *, per_position: bool = False) -> xr.Dataset:
    """AtP score of every head (module docstring); ``per_position=True`` adds ``per_position`` (layer, head, pos).

    ``clean`` holds the gradients; ``corrupt`` the same prompts' corrupted twins (e.g. ``--data ioi`` and
    ``ioi-abc`` with the same ``--seed`` and ``--n-seq``). Lazy: sums stream over the stores' batch chunks."""
    metric = check_pair(clean, corrupt, "attribution-patching", NEEDS)
    dz = f32(corrupt["z"]) - f32(clean["z"])
    per = xr.dot(dz, f32(clean["grad_z"]), dim="d_head")  # (batch, layer, pos, head)
    per_sequence = per.sum("pos").transpose("layer", "head", "batch")
    out = xr.Dataset({"score": per_sequence.mean("batch"), "per_sequence": per_sequence})
    if per_position:
        out["per_position"] = per.mean("batch").transpose("layer", "head", "pos")
    out.attrs = {"analyzer": "attribution-patching", "metric": metric, "per_position": int(per_position)}
    return out

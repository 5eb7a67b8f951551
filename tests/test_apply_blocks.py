"""``analyze._apply.apply_blocks`` gives what ``xr.apply_ufunc(dask="parallelized")`` gives, block for block, without
dask's concatenation copy of the input blocks."""

from __future__ import annotations

import dask.array.core
import numpy as np
import pytest
import xarray as xr

from headstore.analyze._apply import apply_blocks


def _kernel(a: np.ndarray, w: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a (batch, layer, head, q, k), w (k, d) without loop dims, m (batch, 1|layer, q): two outputs."""
    s = np.einsum("blhqk,kd->blhqd", a, w)
    return (s * m[:, :, None, :, None]).sum(3), a.sum((3, 4))


def _inputs(chunked: bool) -> tuple[xr.DataArray, xr.DataArray, xr.DataArray]:
    rng = np.random.default_rng(0)
    a = xr.DataArray(rng.standard_normal((6, 4, 3, 5, 5)), dims=("batch", "layer", "head", "q", "k"))
    w = xr.DataArray(rng.standard_normal((5, 2)), dims=("k", "d"))
    m = xr.DataArray(rng.standard_normal((6, 5)), dims=("batch", "q"))  # lacks layer: a size-1 axis there
    if chunked:
        a, w, m = a.chunk({"batch": 2, "layer": (1, 3)}), w.chunk(), m.chunk({"batch": 2})
    return a, w, m


CORE = {"input_core_dims": [["head", "q", "k"], ["k", "d"], ["q"]], "output_core_dims": [["head", "d"], ["head"]]}


@pytest.mark.parametrize("chunked", [True, False])
def test_equals_apply_ufunc(chunked: bool) -> None:
    a, w, m = _inputs(chunked)
    want = xr.apply_ufunc(_kernel, a, w, m, **CORE, dask="parallelized", output_dtypes=[np.float64, np.float64])
    got = apply_blocks(_kernel, a, w, m, **CORE, output_dtypes=[np.float64, np.float64])
    for g, x in zip(got, want, strict=True):
        assert g.dims == x.dims and g.shape == x.shape
        if chunked:
            assert g.chunks == x.chunks  # the same blocks: (2, 2, 2) x (1, 3)
        np.testing.assert_array_equal(g.values, x.values)


def test_blocks_reach_the_kernel_uncopied(monkeypatch: pytest.MonkeyPatch) -> None:
    """apply_ufunc's graph concatenates (copies) each input block along its core dims, in each of the 6 tasks;
    apply_blocks' does not: its one concatenate3 is compute() assembling the result's blocks."""
    calls: list[int] = []
    orig = dask.array.core.concatenate3
    monkeypatch.setattr(dask.array.core, "concatenate3", lambda arrays: calls.append(1) or orig(arrays))
    a, w, m = _inputs(True)
    outs = apply_blocks(_kernel, a, w, m, **CORE, output_dtypes=[np.float64, np.float64])
    outs[0].data.compute(scheduler="sync")
    assert len(calls) == 1
    calls.clear()
    want = xr.apply_ufunc(_kernel, a, w, m, **CORE, dask="parallelized", output_dtypes=[np.float64, np.float64])
    want[0].data.compute(scheduler="sync")
    assert len(calls) >= 1 + 6 * 3  # the control: the copies this module avoids

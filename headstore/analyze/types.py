"""The parameter types analyzers declare (``AnalyzerSpec.params``), defined once for the library and the CLI.

Each is the Python value an analyzer takes; the command line keys its string parsers by these types
(``headstore.cli.parse``). ``Annotated`` tags keep apart types whose Python values look alike
(a position and a token id are both ints or one int per sequence).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal, TypeAlias

import numpy as np
import xarray as xr

Head: TypeAlias = tuple[int, int]
Heads: TypeAlias = Sequence[tuple[int, int]] | Literal["all"]
Positions: TypeAlias = Annotated[int | Sequence[int] | np.ndarray | xr.DataArray, "position"]
TokenIds: TypeAlias = Annotated[int | Sequence[int] | np.ndarray | xr.DataArray, "token ids"]
Token: TypeAlias = Annotated[int | str, "token"]  # an id, or a string that is one vocabulary entry
Embedding: TypeAlias = Literal["W_E", "W_EE"]
ErrorMeasure: TypeAlias = Literal["mul", "abs"]
CompositionKinds: TypeAlias = tuple[Literal["Q", "K", "V"], ...]
HeadScoreKinds: TypeAlias = tuple[Literal["previous_token", "duplicate_token", "induction", "bos", "self"], ...]

__all__ = [
    "CompositionKinds",
    "Embedding",
    "ErrorMeasure",
    "Head",
    "HeadScoreKinds",
    "Heads",
    "Positions",
    "Token",
    "TokenIds",
]

"""``code-ifelse[:PATHS]``: prompts cut from real Python source (placeholder until issue 4 lands)."""

from __future__ import annotations

from typing import Any

from headstore.extract.data import DataRequest, TokenDataset
from headstore.store_schema.errors import HeadstoreError


def build_ifelse(arg: str, req: DataRequest, tokenizer: Any) -> TokenDataset:
    raise HeadstoreError("data 'code-ifelse' is not built yet: use ioi, ioi-abc, text or tokens")

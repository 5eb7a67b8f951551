"""Where a store lives, decided once: a local folder or a URL, the fsspec options that go with it, and joins.

As zarr's ``make_store_path`` turns any StoreLike into one ``StorePath``, ``StorePath.of`` turns what a user
passes (a folder, a ``file://`` URL, an ``http(s)://`` or ``s3://`` URL, with or without storage options)
into one value that every reader and writer asks: is it local, which options does fsspec get, where is a
path relative to it.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zarr

from headstore.store_schema.errors import missing_dependency


def is_local(path: str | os.PathLike[str]) -> bool:
    """A folder on this machine: a plain path or a ``file://`` URL."""
    return "://" not in str(path) or str(path).startswith("file://")


@dataclass(frozen=True)
class StorePath:
    """A store's location: ``url`` as the user gave it (a folder or a URL), ``storage_options`` for a remote one."""

    url: str
    storage_options: dict[str, Any] | None = None

    @classmethod
    def of(cls, path: str | os.PathLike[str] | StorePath, storage_options: dict[str, Any] | None = None) -> StorePath:
        if isinstance(path, StorePath):
            return path
        return cls(str(path), storage_options)

    @property
    def local(self) -> bool:
        return is_local(self.url)

    @property
    def http(self) -> bool:
        return self.url.startswith(("http://", "https://"))

    @property
    def options(self) -> dict[str, Any] | None:
        """What fsspec gets: the storage options of a remote store, None for a local one."""
        return None if self.local else self.storage_options

    @property
    def folder(self) -> Path:
        """The local folder (``file://`` removed)."""
        return Path(self.url.removeprefix("file://"))

    def join(self, ref_path: str) -> StorePath:
        """``ref_path`` as seen from this store: a URL or an absolute path as is, else relative to it."""
        return StorePath(resolve(self.url, ref_path), self.storage_options)

    def open_group(self) -> zarr.Group:
        """The root group, read-only (its metadata read once)."""
        with self.needs_packages():
            return zarr.open_group(self.url, mode="r", zarr_format=3, storage_options=self.options)

    @contextmanager
    def needs_packages(self) -> Iterator[None]:
        """Around what makes fsspec import the filesystem of a URL: a missing package (``s3fs`` for
        ``s3://``) becomes one line naming what to install, not fsspec's bare ImportError."""
        try:
            yield
        except ImportError as e:
            error = missing_dependency(e, f"reading {self.url.split('://')[0]}:// stores ({self.url})")
            if error is None:
                raise
            raise error from e

    def __str__(self) -> str:
        return self.url


def resolve(store: str, ref_path: str) -> str:
    """Where a reference points: a URL as is, else relative to the store (a folder or a URL)."""
    if "://" in ref_path or os.path.isabs(ref_path):
        return ref_path
    if "://" in store:
        scheme, rest = store.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest.rstrip('/'), ref_path))}"
    return os.path.normpath(os.path.join(store, ref_path))


def relative_ref(store: str | os.PathLike[str], weights: str | os.PathLike[str]) -> str:
    """The path recorded in a store: ``weights`` relative to the store folder (a URL as is)."""
    if "://" in str(weights):
        return str(weights)
    return os.path.relpath(os.path.abspath(weights), os.path.abspath(store))

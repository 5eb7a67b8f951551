"""The one error type of headstore: its message states the rule that was broken and what to do."""

from __future__ import annotations


class HeadstoreError(Exception):
    """A rule of headstore was broken (bad input, bad store, mismatched stores).

    The message is one line, says which rule, and says what to do.
    """


# the extra of ``pip install 'headstore[EXTRA]'`` that installs each optional module (pyproject.toml)
EXTRAS = {"s3fs": "remote"} | dict.fromkeys(
    ("torch", "transformer_lens", "transformers", "tokenizers", "safetensors", "gguf", "pyarrow", "datasets"),
    "extract",
)
CORE = ("aiohttp", "requests", "fsspec", "zarr", "numcodecs", "crc32c")  # installed with headstore itself


def missing_module(e: BaseException | None) -> str | None:
    """The top-level module whose import failed: ``e``'s, or that of the ImportError it was raised from (fsspec
    re-raises a failed ``import s3fs`` as a bare ``ImportError("Install s3fs to access S3")``)."""
    while e is not None:
        if isinstance(e, ImportError) and e.name:
            return e.name.split(".")[0]
        e = e.__cause__ or e.__context__
    return None


def missing_dependency(e: ImportError, what: str) -> HeadstoreError | None:
    """The one-line error for ``what`` (``"reading s3://bucket/x.zarr"``, ``"extraction"``) failing on a module
    that is not installed, naming what to install; None when the failed import is headstore's own (a bug)."""
    name = missing_module(e)
    if name == "headstore":
        return None
    if name in EXTRAS:
        fix = f"pip install 'headstore[{EXTRAS[name]}]'"
    elif name in CORE:
        fix = f"pip install {name} (a dependency of headstore itself: reinstall it with pip install headstore)"
    elif name:
        fix = f"pip install {name}"
    else:  # no module named: fsspec's own words say which package
        fix = (str(e).splitlines() or ["install the package it names"])[0]
    return HeadstoreError(f"{what} needs {name or 'a package'}, which is not installed: {fix}")

"""The one error type of headstore: its message states the rule that was broken and what to do."""

from __future__ import annotations


class HeadstoreError(Exception):
    """A rule of headstore was broken (bad input, bad store, mismatched stores).

    The message is one line, says which rule, and says what to do.
    """

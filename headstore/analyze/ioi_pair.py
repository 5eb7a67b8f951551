"""``ioi-pair``: the IOI analyzer on an IOI store and its ABC twin (see ``headstore.analyze.ioi``)."""

from headstore.analyze.ioi import PAIR_SPEC as SPEC

__all__ = ["SPEC"]

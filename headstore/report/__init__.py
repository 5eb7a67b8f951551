"""Presenting analyzer results, for the CLI, the main job and anyone else: each declared analyzer's summary
table and figure (``presenters``), running an analyzer into ``OUT/NAME/`` (``run``), and the self-contained
HTML pages (``page``: the per-store report; ``census_report``: the census page). No torch here.
"""

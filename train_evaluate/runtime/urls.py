"""Storage URLs as they may be shown: in messages and in run.json, never with a password."""

from __future__ import annotations


def shown(url: str) -> str:
    """``url`` with its password hidden, for messages and run.json."""
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not even a URL: say so without repeating it
        return "(an unreadable URL)"

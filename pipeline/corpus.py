"""Document corpora. The default is one that every Python install has: CPython's pydoc topics."""

from __future__ import annotations


def pydoc_topics() -> dict[str, str]:
    """CPython's documentation topics (``pydoc_data.topics``): one real document per topic, name -> text."""
    from pydoc_data.topics import topics

    return {name: text for name, text in sorted(topics.items()) if text.strip()}

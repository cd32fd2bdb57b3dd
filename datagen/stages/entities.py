"""Text clean-up of a VLM's answers: the caption, and the entity list parsed from it.

VLMs answer a "list the entities" prompt in every layout: numbered lists, bullets,
one line of commas, "Entities: a dog and a ball.", repeats, a sentence of preamble.
The parser accepts them all and keeps only what can serve as a detector phrase and
a prompt tag label (``<#FF0000 red mask: dog>``): short lowercase noun phrases of
letters, digits, spaces, hyphens and apostrophes, without articles, deduplicated, at
most ``limit``. Anything else (a sentence, "none", an empty answer) is dropped, so a
row may end with no entity at all: the segment stage filters it.
"""

from __future__ import annotations

import re
from typing import Any

from datagen.schema import neutralise_controls

MAX_ENTITIES = 10
MAX_ENTITY_WORDS = 4
MAX_ENTITY_CHARS = 40

_ITEM_SPLIT = re.compile(r"\n|;|,|\u2022|\s\*\s|\s-\s|(?<=[a-z\d])\.\s+|\s+\d{1,2}[.)]\s+")
_LEAD = re.compile(r"^\s*(?:[-*+\u2022\u2013\u2014>#]+|\(?\d{1,2}[.):]|\(?[a-z][.)](?=\s))\s*")
_PREAMBLE = re.compile(
    r"^(?:here (?:are|is)[^:]*|(?:the )?(?:main )?(?:entities|objects|items|things)"
    r"(?: in (?:the|this) image)?(?: are| include)?|entities list|list)\s*:\s*",
    re.IGNORECASE,
)
_ARTICLE = re.compile(r"^(?:a|an|the|some|two|three|several|many)\s+")
_AND = re.compile(r"\s+(?:and|&)\s+")
_NOT_ALLOWED = re.compile(r"[^a-z0-9' -]")
_NOTHING = frozenset({"none", "n a", "na", "nothing", "no entities", "unknown", "etc"})


def _clean_item(item: str) -> str:
    text = _LEAD.sub("", item.strip().lower())
    text = _PREAMBLE.sub("", text)
    text = re.sub(r"\(.*?\)", " ", text)  # "dog (brown)" -> "dog"
    text = text.strip(" \t\"'`.:!?*_")
    text = _ARTICLE.sub("", text)
    text = _NOT_ALLOWED.sub(" ", text)
    text = re.sub(r"\s+", " ", text).strip(" -'")
    return text


def parse_entities(text: str, limit: int = MAX_ENTITIES) -> list[str]:
    """Up to ``limit`` distinct entity phrases from a VLM's answer, in the order given.

    Items are split at line breaks, commas, semicolons, bullets, numbering and
    sentence ends; "a dog and a cat" counts as two. An item longer than
    ``MAX_ENTITY_WORDS`` words or ``MAX_ENTITY_CHARS`` characters is a sentence,
    not an entity, and is dropped."""
    if not text or limit < 1:
        return []
    text = _PREAMBLE.sub("", text.strip())
    out: list[str] = []
    for raw in _ITEM_SPLIT.split(text):
        for part in _AND.split(raw):
            item = _clean_item(part)
            if (
                not item
                or item in _NOTHING
                or not re.search(r"[a-z]", item)
                or len(item.split()) > MAX_ENTITY_WORDS
                or len(item) > MAX_ENTITY_CHARS
                or item in out
            ):
                continue
            out.append(item)
            if len(out) == limit:
                return out
    return out


def clean_caption(text: str) -> str:
    """The caption as stored: one paragraph, whitespace collapsed, and when generation
    stopped mid-sentence (the ``max_new_tokens`` cap) cut back to the last full
    sentence if that keeps at least half of it."""
    text = re.sub(r"\s+", " ", text or "").strip()
    if not text or text[-1] in ".!?\"')":
        return text
    end = max(text.rfind(". "), text.rfind("! "), text.rfind("? "))
    if end >= len(text) // 2:
        return text[: end + 1]
    return text


def plain_captions(meta: dict[str, Any], *keys: str) -> dict[str, Any]:
    """``meta`` with the captions under ``keys`` (strings, or lists of them) stripped of
    prompt control syntax (:func:`datagen.schema.neutralise_controls`); how many pieces
    were changed is added as ``controls_removed`` when any was."""
    removed = 0
    for key in keys:
        value = meta.get(key)
        if isinstance(value, str):
            meta[key], n = neutralise_controls(value)
            removed += n
        elif isinstance(value, list):
            cleaned = [neutralise_controls(v) if isinstance(v, str) else (v, 0) for v in value]
            meta[key] = [v for v, _ in cleaned]
            removed += sum(n for _, n in cleaned)
    if removed:
        meta["controls_removed"] = meta.get("controls_removed", 0) + removed
    return meta

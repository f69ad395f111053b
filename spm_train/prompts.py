"""Prompts as text: function words, a concept's content words, and corpora of captions.

Three parts of the product read prompts as language rather than as embeddings:

- facilitated transport counts shared *content* tokens: articles, prepositions and punctuation say
  nothing about a concept, and counting them opened the "a circle" membrane for every prompt with "a";
- training draws other phrasings of a concept (captions that mention it) and real prompts that do not
  mention it (anchors), from a caption corpus;
- evaluation keeps its sentence templates apart from any the training corpus uses.

A corpus is a list of captions: ToyWorld's own caption generator (``"toyworld"``), or a text file with
one caption per line for real models (for example a few thousand captions of the kind users write).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

logger = logging.getLogger(__name__)

# English function words: articles, pronouns, prepositions, conjunctions, auxiliaries and the fillers of
# prompt writing. A prompt's content is what is left.
FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every no one
of on in at to into onto from by with without for about over under above below between behind near
and or but nor so yet as than then
is are was were be been being am has have had do does did can could will would should may might must
it its it's i me my we our you your he him his she her they them their there here
very quite just also only not
photo picture image
""".split())

_WORD = re.compile(r"[a-z0-9][a-z0-9'\-]*")


def words(text: str) -> list[str]:
    """Lower-case words of ``text`` (punctuation dropped)."""
    return _WORD.findall(text.lower())


def content_words(text: str) -> list[str]:
    """The words of ``text`` that carry content (function words left out), in order."""
    return [w for w in words(text) if w not in FUNCTION_WORDS]


def concept_words(concept: str) -> list[str]:
    """The words that name ``concept``: its content words, or all its words if it has none."""
    return content_words(concept) or words(concept)


def mentions(text: str, concept: str) -> bool:
    """Whether ``text`` contains every word that names ``concept`` (as whole words)."""
    wanted = concept_words(concept)
    present = set(words(text))
    return bool(wanted) and all(w in present for w in wanted)


def mentions_any(text: str, concept: str) -> bool:
    """Whether ``text`` contains any content word of ``concept``."""
    present = set(words(text))
    return any(w in present for w in concept_words(concept))


def replace_concept(text: str, concept: str, replacement: str = "") -> str:
    """``text`` with the content words of ``concept`` replaced by ``replacement`` (the first occurrence
    takes the replacement, later ones are removed), spaces and commas tidied.

    ``replace_concept("a striped red circle", "red")`` is ``"a striped circle"``: the rest of the prompt,
    the neutral that an erase target of this phrasing is pushed towards."""
    drop = set(concept_words(concept))
    out, placed = [], False
    for token in re.split(r"(\s+|,)", text):
        if token.lower().strip() in drop:
            if not placed and replacement:
                out.append(replacement)
            placed = True
            continue
        out.append(token)
    tidy = re.sub(r"\s+", " ", "".join(out))
    tidy = re.sub(r"\s+,", ",", tidy)
    tidy = re.sub(r",\s*,", ",", tidy)
    return tidy.strip(" ,")


def function_token_ids(tokenizer) -> set[int]:
    """Ids of tokens that are function words or punctuation on their own, for ``tokenizer``."""
    ids: set[int] = set()
    vocab = tokenizer.get_vocab()
    # CLIP's BPE marks the end of a word with "</w>": a piece without it is the start of a longer word
    # ("do" in "dotted") and names nothing by itself
    word_marked = any(token.endswith("</w>") for token in vocab)
    for token, idx in vocab.items():
        text = token.replace("</w>", "").strip().lower()
        if not text:
            continue
        if not any(ch.isalnum() for ch in text):
            ids.add(idx)
        elif text in FUNCTION_WORDS and (token.endswith("</w>") or not word_marked):
            ids.add(idx)
    return ids


@dataclass(frozen=True)
class PromptCorpus:
    """Captions to draw phrasings and anchors from.

    ``synonyms``: (word, other word) pairs the captions use for the same thing ("red", "crimson"). A
    caption that names a concept by a synonym is one of its phrasings and never an anchor: "a crimson
    square" is not a prompt the membrane of red should leave as it is.
    """

    captions: tuple[str, ...]
    source: str = ""
    synonyms: tuple[tuple[str, str], ...] = ()

    @classmethod
    def load(cls, source: str, *, size: int = 2000, seed: int = 0) -> "PromptCorpus":
        """``"toyworld"``: ``size`` captions of random scenes of the active ToyWorld (its caption forms and
        synonyms); otherwise a text file with one caption per line (blank lines and ``#`` comments
        skipped)."""
        if source == "toyworld":
            import numpy as np

            from .toyworld.render import WORLD, caption, random_scene

            rng = np.random.default_rng(seed)
            captions = tuple(caption(random_scene(rng), rng) for _ in range(size))
            return cls(captions, source, WORLD.synonyms)
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prompt corpus {source!r} is neither 'toyworld' nor a readable file")
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        captions = tuple(ln for ln in lines if ln and not ln.startswith("#"))
        if not captions:
            raise ValueError(f"prompt corpus {source!r} holds no captions")
        return cls(captions, str(path))

    def names(self, concept: str) -> list[str]:
        """``concept`` and every way of saying it with synonyms of its words ("red circle", "crimson
        circle", "red disc", "crimson disc"), the concept first."""
        table: dict[str, list[str]] = {}
        for word, other in self.synonyms:
            table.setdefault(word, []).append(other)
        spoken = [""]
        for word in words(concept):
            options = [word] + table.get(word, [])
            spoken = [f"{head} {option}".strip() for head in spoken for option in options]
        return _distinct([concept] + spoken, None)

    def phrasings(self, concept: str, limit: int | None = None) -> list[str]:
        """Distinct captions that mention ``concept`` under any of its names: other phrasings of it, in
        corpus order."""
        names = self.names(concept)
        return _distinct((c for c in self.captions if any(mentions(c, n) for n in names)), limit)

    def unrelated(self, concepts: Sequence[str], limit: int | None = None) -> list[str]:
        """Distinct captions that mention no content word of ``concepts`` under any of their names."""
        names = [n for k in concepts for n in self.names(k)]
        return _distinct((c for c in self.captions if not any(mentions_any(c, n) for n in names)), limit)

    def replace(self, text: str, concept: str, replacement: str = "") -> str:
        """``replace_concept`` for whichever name of ``concept`` the text uses ("a crimson square" with
        red replaced by "blue" is "a blue square")."""
        for name in self.names(concept):
            if mentions(text, name):
                return replace_concept(text, name, replacement)
        return replace_concept(text, concept, replacement)


def _distinct(items: Iterable[str], limit: int | None) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item, None)
        if limit is not None and len(seen) >= limit:
            break
    return list(seen)

"""NegEx-style negation and hedging scope for report sentences.

Why rules and not embeddings: similarity models are known to ignore negation ("no mass" lands
next to "mass"; cf. arXiv 2512.17121 on CLIP's failures with negated prompts), and a report
that says "no mass" about a tumour must be caught. The rules follow NegEx (Chapman et al. 2001):
pre-negation triggers scope forward, post-negation triggers scope backward, both for a few words
and never past a termination term ("but", "however", ...); pseudo-triggers ("no change",
"cannot be excluded") are matched first so that they do not negate. Hedges ("possible",
"differential", "less likely") mark a mention as uncertain rather than asserted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

WINDOW = 6  # words a trigger reaches

PRE_NEGATION = (
    "no evidence of", "no sign of", "no signs of", "no features of", "no suggestion of", "absence of",
    "nothing to suggest", "nothing suggests", "nothing suggestive of", "nothing to indicate", "no indication of",
    "nothing in keeping with", "nothing consistent with",
    "negative for", "free of", "lack of", "rules out", "ruled out", "without", "cannot be seen",
    "does not", "do not", "did not", "is not", "are not", "was not", "were not", "has not", "have not",
    "doesn't", "don't", "isn't", "aren't", "wasn't", "weren't", "not", "no", "neither", "nor", "never",
    "none", "lacks", "excludes", "sparing", "spares", "without involvement of", "not involving",
)
POST_NEGATION = (
    "is absent", "are absent", "are all absent", "all absent", "absent", "not seen", "not identified", "not present",
    "not detected", "not suggested", "not supported", "not evident", "not shown", "not indicated", "not favoured",
    "not favored", "no longer favoured", "no longer favored", "not the favoured",
    "not likely", "negative",
    "not visible", "not demonstrated", "not involved", "is excluded", "are excluded", "excluded",
    "was ruled out", "is ruled out", "ruled out", "is spared", "are spared", "spared", "unlikely", "none",
)
PSEUDO = (
    "no increase", "no change", "no further", "not only", "not necessarily", "without difficulty",
    "cannot exclude", "cannot be excluded", "can not be excluded", "cannot rule out", "cannot be ruled out",
    "not ruled out", "not excluded", "to rule out", "rule out", "whether or not", "no longer",
    "no doubt", "without doubt", "without a doubt", "no question",
    # what is negated is the word itself, not a mention near it (an outside probe, session 39: "the pixel spacing is
    # not known, the lesion cannot be measured" denied the lesion; "not unlikely" the favoured class)
    "not known", "is not known", "cannot be measured", "can not be measured", "not be measured", "not measured",
    "not unlikely", "not improbable", "not impossible",
    # (an outside probe, session 40: "Without a known pixel spacing, the lesion can only be sized in pixels" denied it)
    "without a known", "without known", "without a recorded", "without a given", "without the pixel spacing",
    "without pixel spacing", "without a pixel spacing", "without spacing",
    # "the salient area shows where the classifier looked, not the lesion itself" (round 9 of the outside probes)
    "not the lesion itself", "not the tumour itself", "not the tumor itself", "not the mass itself",
)
HEDGES = (
    "cannot exclude", "cannot be excluded", "can not be excluded", "cannot rule out", "cannot be ruled out",
    "not ruled out", "not excluded", "to rule out", "rule out", "possible", "possibly", "probable", "probably",
    "likely", "less likely", "unlikely", "may", "might", "could", "suspicious for", "suggestive of",
    "differential", "differential diagnosis", "versus", "vs", "alternatively", "other classes", "considered",
    "uncertain", "suggests", "suggest", "suggesting",
)
TERMINATORS = (
    "but", "however", "although", "though", "except", "apart from", "aside from", "whereas", "while", "yet",
    "which", "instead", "rather",
)

_WORD = re.compile(r"[a-z0-9]+(?:['’][a-z]+)?|[^\sa-z0-9]")


@dataclass(frozen=True)
class Polarity:
    negated: bool
    uncertain: bool

    @property
    def affirmed(self) -> bool:
        return not self.negated


def split_sentences(text: str) -> list[tuple[int, str]]:
    """(start offset, sentence) pairs; decimals like 0.82 do not end a sentence."""
    out = []
    start = 0
    for m in re.finditer(r"(?<!\d)[.!?;](?!\d)|\n+|(?<=\d)\.(?=\s|$)", text):
        seg = text[start:m.end()]
        if seg.strip():
            out.append((start, seg))
        start = m.end()
    if text[start:].strip():
        out.append((start, text[start:]))
    return out


def _tokens(sentence: str) -> list[tuple[str, int, int]]:
    low = sentence.lower()
    return [(m.group(0), m.start(), m.end()) for m in _WORD.finditer(low)]


@cache
def _phrases(words: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    return tuple(sorted((tuple(w.split()) for w in words), key=len, reverse=True))


def _find(tokens: list[str], phrases: tuple[str, ...]) -> list[tuple[int, int]]:
    """Token index ranges [i, j) where any phrase occurs (longest first, no overlaps)."""
    hits: list[tuple[int, int]] = []
    taken = [False] * len(tokens)
    for ph in _phrases(phrases):
        n = len(ph)
        for i in range(len(tokens) - n + 1):
            if tuple(tokens[i:i + n]) == ph and not any(taken[i:i + n]):
                hits.append((i, i + n))
                for k in range(i, i + n):
                    taken[k] = True
    return sorted(hits)


class SentenceScope:
    """Negation and hedge scopes of one sentence, queried by character span."""

    def __init__(self, sentence: str):
        self.sentence = sentence
        toks = _tokens(sentence)
        self.words = [t[0].replace("’", "'") for t in toks]
        self.starts = [t[1] for t in toks]
        self.ends = [t[2] for t in toks]
        pseudo = _find(self.words, PSEUDO)
        blocked = {k for a, b in pseudo for k in range(a, b)}
        self.pre = [h for h in _find(self.words, PRE_NEGATION) if not any(k in blocked for k in range(*h))]
        self.post = [h for h in _find(self.words, POST_NEGATION) if not any(k in blocked for k in range(*h))]
        self.term = {i for a, b in _find(self.words, TERMINATORS) for i in range(a, b)}
        self.term |= {i for i, w in enumerate(self.words) if w in (";", ":")}
        self.hedged = bool(_find(self.words, HEDGES))

    def _token_range(self, start: int, end: int) -> tuple[int, int]:
        idx = [i for i, (s, e) in enumerate(zip(self.starts, self.ends, strict=True)) if s < end and e > start]
        if not idx:
            return (len(self.words), len(self.words))
        return idx[0], idx[-1] + 1

    def _words_between(self, a: int, b: int) -> list[int]:
        return [i for i in range(a, b) if re.match(r"[a-z0-9]", self.words[i])]

    def polarity(self, start: int, end: int) -> Polarity:
        """Polarity of the mention at character span [start, end) of this sentence."""
        ta, tb = self._token_range(start, end)
        negated = False
        for _a, b in self.pre:
            if b <= ta and len(self._words_between(b, ta)) < WINDOW and not any(i in self.term for i in range(b, ta)):
                negated = True
        for a, _b in self.post:  # "Mass: absent." - a colon right before the trigger labels, not terminates
            ends = [i for i in range(tb, a) if i in self.term and not (self.words[i] == ":" and i == a - 1)]
            if a >= tb and len(self._words_between(tb, a)) < WINDOW and not ends:
                negated = True
        return Polarity(negated=negated, uncertain=self.hedged)


def polarity_of(sentence: str, phrase: str) -> Polarity | None:
    """Polarity of the first occurrence of ``phrase`` in ``sentence`` (None when absent)."""
    i = sentence.lower().find(phrase.lower())
    if i < 0:
        return None
    return SentenceScope(sentence).polarity(i, i + len(phrase))

"""Negation scope (NegEx-style rules): a corpus of report sentences with and without negation.

Why a corpus: embedding similarity ignores negation (cf. arXiv 2512.17121 on CLIP and negated
prompts), so the verifier relies on these rules; each sentence pins one behaviour.
"""

from __future__ import annotations

import pytest

from tumorlens.report.negation import polarity_of, split_sentences

# (sentence, target phrase, negated, uncertain)
CORPUS = [
    # plain assertions
    ("A mass is seen in the left frontal lobe.", "mass", False, False),
    ("There is a glioma in the left insular cortex.", "glioma", False, False),
    ("The lesion involves the right thalamus.", "thalamus", False, False),
    ("The tumour crosses the midline.", "midline", False, False),
    ("Findings are consistent with meningioma.", "meningioma", False, False),
    # pre-negation triggers
    ("There is no midline shift.", "midline shift", True, False),
    ("No enhancing mass is seen.", "mass", True, False),
    ("No evidence of haemorrhage.", "haemorrhage", True, False),
    ("Without oedema or mass effect.", "mass effect", True, False),
    ("The lesion does not cross the midline.", "midline", True, False),
    ("It isn't in the right hemisphere.", "right", True, False),
    ("Negative for glioma.", "glioma", True, False),
    ("Absence of hydrocephalus.", "hydrocephalus", True, False),
    ("Neither the thalamus nor the putamen is involved.", "putamen", True, False),
    # post-negation triggers
    ("The thalamus is not involved.", "thalamus", True, False),
    ("Haemorrhage is absent.", "haemorrhage", True, False),
    ("A mass was not seen.", "mass", True, False),
    ("Meningioma is ruled out.", "meningioma", True, False),
    ("The brain stem is spared.", "brain stem", True, False),
    # the subject before a negated verb stays affirmed
    ("The lesion does not cross the midline.", "lesion", False, False),
    ("The tumour is not in the thalamus.", "tumour", False, False),
    # termination terms end the scope
    ("There is no oedema, but a large mass is present.", "mass", False, False),
    ("No hydrocephalus; a glioma is seen on the left.", "glioma", False, False),
    ("No haemorrhage, however the lesion crosses the midline.", "lesion", False, False),
    # scope is a few words only
    ("No shift is seen and the appearance of the left temporal region suggests a glioma.", "glioma", False, True),
    # pseudo-negations do not negate
    ("No change in the mass.", "mass", False, False),
    ("Not only the insula but the frontal lobe is involved.", "frontal lobe", False, False),
    # uncertainty: hedged, not negated
    ("Glioma cannot be excluded.", "glioma", False, True),
    ("Possible meningioma.", "meningioma", False, True),
    ("The differential includes pituitary tumour.", "pituitary tumour", False, True),
    ("Meningioma is unlikely.", "meningioma", True, True),
]


@pytest.mark.parametrize("sentence,phrase,negated,uncertain", CORPUS)
def test_negation_corpus(sentence, phrase, negated, uncertain):
    pol = polarity_of(sentence, phrase)
    assert pol is not None
    assert pol.negated is negated, f"{sentence!r}: {phrase!r} negated={pol.negated}"
    assert pol.uncertain is uncertain, f"{sentence!r}: {phrase!r} uncertain={pol.uncertain}"


def test_corpus_is_balanced():
    neg = sum(1 for *_, n, _u in CORPUS if n)
    assert 10 <= neg <= len(CORPUS) - 10  # both polarities well represented


def test_sentence_split_keeps_decimals():
    parts = [s.strip() for _, s in split_sentences("Glioma (probability 0.82). Left side; no shift. Area 12.5 mm2.")]
    assert parts == ["Glioma (probability 0.82).", "Left side;", "no shift.", "Area 12.5 mm2."]

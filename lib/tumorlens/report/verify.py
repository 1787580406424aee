"""Check every claim of a report against the findings record it was written from.

A claim is any mention of an anatomical region, a side, a tumour class, the presence of a
tumour, midline crossing, a number, or a feature the pipeline does not measure (oedema,
enhancement, midline shift, ...). Each mention gets a polarity from :mod:`.negation`, so "no
mass" about a glioma is a *negation conflict*, "a mass in the right thalamus" about a left
insular lesion is an *unsupported claim*, and "no midline shift" is unsupported because nothing
measured it. The result lists every claim checked, so a reader can see what was and was not
verified.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

from tumorlens.labels import CLASS_NAMES, NO_TUMOUR
from tumorlens.report.facts import (
    HISTORY_NEGATED,
    MAX_ENTROPY,
    READABLE_CLASS,
    Facts,
    history_clauses,
    numbers_for_unit,
)
from tumorlens.report.negation import Polarity, SentenceScope, split_sentences
from tumorlens.report.schema import RadiologyReport

# ---- lexicons ---------------------------------------------------------------------------------------

# features and diagnoses no stage of the pipeline measures: any statement about them, asserted or
# negated, is unsupported
UNMEASURED = {
    "midline shift": r"midline shift|shift of the midline",
    "mass effect": r"mass effect|effac\w*|compress\w*|displac\w*|distort\w*|deviat\w*",
    "oedema": r"o?edema|oedematous|edematous|swelling",
    "enhancement": r"(?<!contrast-)(?<!contrast )enhanc(?:ing|ement|es)",
    "necrosis": r"necro(?:sis|tic)",
    "haemorrhage": r"ha?emorrhag\w*|bleed(?:ing)?|blood products",
    "calcification": r"calcifi\w*",
    "hydrocephalus": r"hydrocephal\w*|ventriculomegaly",
    "herniation": r"herniat\w*",
    "infiltration": r"infiltrat\w*|invasi\w*|invad\w*",
    "cystic change": r"cysts?|cystic",
    "shape or texture": (r"heterogene\w*|homogene\w*|irregular\w*|well[- ]?circumscribed|well[- ]?defined|ill[- ]?defined|"
                         r"lobulated|spiculated|ring-?like|rim"),
    "multiplicity": r"multifocal|multicentric|solitary|numerous|innumerable|countless|(?:a )?single (?:lesion|focus|mass|tumou?r)|"
                    r"multiple (?:lesions|foci|masses|tumou?rs)|(?:two|three|four|several) "
                    r"(?:separate |distinct )?(?:lesions|foci|masses|tumou?rs)|satellite",
    "signal intensity": r"hyper-?intens\w*|hypo-?intens\w*|iso-?intens\w*|signal (?:change|abnormality|intensity)",
    "diffusion": r"restricted diffusion|diffusion restriction|perfusion",
    "grade": r"(?:who )?grade [iv1-4]+\b|high-grade|low-grade|high grade|low grade|atypical|anaplastic",
    "dural attachment": r"dural(?:-based| tail| attachment)?|extra-?axial|intra-?axial|meninges|meningeal|parafalcine|falx",
    # what a small model adds from general knowledge (the local GGUF model called a meningioma "a rare
    # and aggressive form of brain cancer" and recommended chemotherapy): nothing here assesses it
    "behaviour or prognosis": (
        r"non-?(?:malignan\w*|cancer(?:ous)?|aggressive|benign)|"  # the word starts at "non": one claim
        r"aggressive(?:ness)?|benign|malignan\w*|cancer(?:ous|s)?|prognos\w*|survival|life-threatening|fatal|"
        r"lethal|deadly|sinister|terminal|(?:in)?curable|life expectancy|"
        r"slow-growing|fast-growing|rapidly growing|\brare\b|recur(?:s|red|ring|rence|rences|rent)?|indolent|"
        r"(?:likely|expected|unlikely|going) to (?:grow|spread|return|enlarge)|will (?:grow|spread|enlarge)"
    ),
    # one study, no prior: nothing can have grown, shrunk or stayed stable
    "change since earlier imaging": (
        r"(?:prior|previous|earlier|last|baseline|comparison) (?:study|studies|scan|scans|exam\w*|imaging|mri)|"
        r"interval (?:change|growth|increase|decrease|progression)|has (?:grown|shrunk|enlarged|progressed|regressed)|"
        r"\bgrew\b|progressi(?:on|ve)|regressi(?:on|ve)|unchanged|stable (?:appearances? )?(?:in size|compared|since)|"
        r"enlarg(?:ing|es)|growing|shrink(?:s|ing)|progress(?:es|ing)|regress(?:es|ing)|as before|as previously|"
        r"previously (?:seen|noted|described|reported)|long-?standing|post-?operative|pre-?operative|"
        r"(?:slowly|gradually) (?:grown|enlarged|grew|enlarging)"
    ),
    # (an outside probe, session 39: "Coronal T2 image", "scanned on a 3 T scanner" passed)
    "sequence or field strength": (r"\bt[12](?:-weighted|w)?\b|\bflair\b|\bdwi\b|\bswi\b|\bdti\b|\bpd-weighted|"
                                   r"\b\d(?:\.\d)?\s*t(?:esla)?\b(?! ?(?:x|by))|\btesla\b|gadolinium|\bgad(?:olinium)?-enhanced|"
                                   r"post-?contrast|pre-?contrast|contrast[- ]enhanced|with contrast|without contrast"),
    "size class of an adenoma": r"macroadenomas?|microadenomas?",
    # an automated result never excludes disease (an outside probe, session 40: "Disease can be ruled out" and "the
    # negative automated result excludes disease" passed); the caution itself ("does not exclude disease") is allowed
    "exclusion of disease": (r"free (?:of|from) (?:any )?(?:disease|pathology|abnormalit(?:y|ies)|malignan(?:cy|cies))|"
                             r"disease-free|"
                             r"(?:disease|pathology|abnormalit(?:y|ies)|malignan(?:cy|cies)|cancer|neoplas(?:m|ms|ia))"
                             r"(?: (?:can|could|may|is|are|has been|have been|was|were))?(?: (?:safely|confidently|"
                             r"reliably|definitively|now))?(?: be)? (?:excluded|ruled out)|"
                             r"(?:excludes?|excluding|excluded|rules? out|ruling out|ruled out)(?: (?:any|all|the))?"
                             r"(?: (?:presence|possibility) of)?(?: (?:significant|intracranial|brain))? (?:disease|"
                             r"pathology|abnormalit(?:y|ies)|malignan(?:cy|cies)|cancer|neoplas(?:m|ms|ia))"),
    "how the model was trained": (r"trained on (?:3-?d|three-dimensional|volumetric)\b|"
                                  # (an outside probe, session 40: "A 3D network classified the whole volume at once")
                                  r"(?:3-?d|three-dimensional|volumetric) (?:network|model|cnn|classifier)|"
                                  r"(?:whole|entire) volume at once"),
    "size by comparison with an object": (r"\b(?:golf[- ]ball|tennis[- ]ball|ping[- ]pong ball|walnut|grape|lemon|"
                                          r"orange|pea|marble|coin)s?\b"),
    # the result taken as final, whatever the record says: it is a research output a radiologist reviews (outside
    # probes, sessions 40: "The classification can be relied on", "reliable enough to act on without review", "taken at
    # face value" passed)
    "the result taken as final": (r"(?:can|could|may|should) be (?:safely |fully )?(?:relied|depended) (?:up)?on|"
                                  r"(?:can|could|may|should) be (?:safely |fully )?trusted|dependabl[ey]|taken at face value|"
                                  r"(?:act|acted|acting) (?:up)?on(?: it| this| the result| the classification)? without|"
                                  r"without (?:a |any |further |radiologist(?:'s)? |expert |human )?(?:review|reading|check)"),
    # "review is recommended, though it is not essential": the review waived in a sentence about it
    "waived review": r"\b(?:not|never)\s+(?:strictly\s+|really\s+|absolutely\s+)?(?:essential|necessary|needed|required|"
                     r"mandatory|obligatory|compulsory)\b|\boptional\b",
    # the model gives probabilities: a report may not turn them into certainty
    "certainty": r"\bdefinite(?:ly)?\b|\bcertain(?:ly|ty)?\b|unequivocal(?:ly)?|undoubted(?:ly)?|conclusive(?:ly)?|"
                 r"\bconfirm(?:s|ed|ing|ation)?\b|pathognomonic|diagnostic of",
    # what to do next, beyond the review every report asks for: nothing here weighs it (session 36 probe: "No
    # further imaging is required", "Discharge the patient" passed)
    "management": (r"no (?:further|additional) (?:imaging|follow-?up|investigations?|work-?up|scans?)|"
                   # the review itself waived (an outside probe, session 40: "No further review is needed" passed as
                   # the whole recommendation)
                   r"no (?:(?:further|additional|radiologist(?:'s)?|expert|human|formal|manual|specialist)\s+)*(?:review|"
                   r"reading|read|assessment|evaluation|opinion|check(?:ing)?|input) (?:is |was )?(?:needed|required|"
                   r"necessary|warranted|essential)|"
                   r"(?:review|reading|assessment|evaluation|checking|radiologist) (?:is |are )?(?:not |no longer |un)"
                   r"(?:required|needed|necessary|warranted)|"
                   r"needs? not (?:be )?(?:review(?:ed)?|read|check(?:ed)?|assess(?:ed)?|see|seen)|(?:does|do|did)(?:n't| not) "
                   r"need (?:to (?:be )?)?(?:review(?:ed)?|read|check(?:ed)?|see|a review|a radiologist)|"
                   r"no need (?:for|to)\b|(?:can|may) (?:safely )?(?:skip|forgo|omit|dispense with|bypass) (?:the )?"
                   r"(?:review|reading|radiologist)|(?:review|reading)\s+(?:can|may|could)\s+(?:safely\s+)?be\s+(?:skipped|"
                   r"omitted|waived|dispensed with|forgone|bypassed)|(?:review|reading) (?:is|would be) optional|"
                   r"(?:imaging|follow-?up|scans?) (?:is |are )?(?:not )?(?:required|needed|necessary|warranted)|"
                   r"\bdischarg\w*|\brefer(?:ral|red)? to\b|\bmdt\b|multidisciplinary|"
                   # a schedule or a work-up (an outside probe, session 38: "Follow-up MRI in 3 months", "Annual
                   # surveillance imaging", "Watchful waiting", "prolactin levels" passed)
                   r"follow-?up (?:mri|imaging|scans?|studies|study|exam(?:ination)?s?)|(?:repeat|surveillance|interval|serial) "
                   r"(?:mri|imaging|scans?|studies|study)|\bsurveillance\b|watchful waiting|wait[- ]and[- ]see|"
                   r"in \d+(?:\.\d+)? (?:days?|weeks?|months?|years?)|\bannual(?:ly)?\b|\bevery \d+ (?:weeks?|months?|years?)|"
                   r"endocrin\w*|hormon\w*|prolactin\w*|laboratory|blood tests?|visual fields?"),
    # a no-tumour call on one slice or through a 2D network is not a normal study: the other structures and
    # diseases were never looked at
    # ("normal study" itself is checked with the tumour words below: a conflict on a tumour call)
    # what the rest of the brain looks like: nothing looked at it (a probe's "The brain parenchyma is otherwise
    # normal." passed for a glioma)
    "the rest of the brain": (r"(?:otherwise|elsewhere) (?:normal|unremarkable)|(?:rest|remainder) of the (?:brain|study|"
                              r"scan|examination) (?:is |appears |looks )?(?:normal|unremarkable)|parenchyma (?:is |appears "
                              r"|looks )?(?:otherwise )?(?:normal|unremarkable)"),
    # sides in words the checks below do not weigh: write left or right (a probe: "hemisphaerium dexter",
    # "dextral", "sinistral", "R > L", "contralateral" passed)
    "side in other words": (r"dext(?:er|ral|rum|ra)|sinistr(?:al|um|a)|[rl]\s*>\s*[rl]|[rl]-sided|contralateral|ipsilateral|"
                            r"\b[lr] (?:hemisphere|side)"),
    # abbreviated region names: several regions share each ("PCG": precentral, postcentral or posterior cingulate)
    "abbreviated region": r"pcg|pcc|acc|mfg|sfg|ifg|stg|mtg|itg|dlpfc|smg",
    # size in units the findings never use
    "size in other units": r"inch(?:es)?|feet|ft|lit(?:re|er)s?|decilit(?:re|er)s?",
    "normality of the study": (r"no intracranial abnormalit\w*|"
                               r"tumou?r (?:is |has been )?(?:excluded|ruled out)|(?:excludes?|rules? out) (?:a )?tumou?r"),
    "treatment": (
        r"surg(?:ery|ical)|resect\w*|neurosurg\w*|radiation|radiotherapy|radiosurgery|chemotherap\w*|"
        r"biops(?:y|ies)|\btreat(?:ment|ments|ed|ing|s)?\b|therap(?:y|ies)|"
        # medicines and their verbs (an outside probe, session 38: temozolomide, dexamethasone, bevacizumab,
        # levetiracetam, cabergoline and "Steroids" passed)
        r"temozolomide|dexamethasone|bevacizumab|levetiracetam|cabergoline|bromocriptine|lomustine|carmustine|"
        r"procarbazine|vincristine|octreotide|lanreotide|pegvisomant|(?:cortico)?steroids?|anti-?(?:epileptics?|"
        r"convulsants?|seizure)|medications?|medicines?|drugs?|\bdos(?:e|es|age|ing)\b|"
        r"\b(?:start|begin|initiate|commence|prescrib)\w*"
    ),
    "diagnosis outside the classifier's classes": (
        r"glioblastomas?|astrocytomas?|oligodendrogliomas?|ependymomas?|metasta\w*|lymphomas?|abscess(?:es)?|"
        r"schwannomas?|craniopharyngiomas?|medulloblastomas?|ha?emangioblastomas?|infarcts?|stroke|"
        r"demyelinat\w*|multiple sclerosis|encephalitis|gliosis|\bgbm\b|prolactinomas?|neuromas?|"
        r"(?:somatotroph|corticotroph|gonadotroph)\w*|\bpnet\b|dnet|gangliogliomas?|chordomas?"
    ),
}

# what a report says about how far the result can be trusted: the findings measure that (the entropy's
# level, the familiarity check, the out-of-scope notes), so it is checked against them, not left unread
UNCERTAINTY_LEVEL = (
    r"(?:(?:classifier|classification|model|prediction|predictive|diagnostic)(?:'s)? )?uncertainty (?:(?:for|of|in|on|about) "
    r"(?:this|the) (?:image|slice|volume|case|study|scan|result|call) )?(?:is |was |remains |"
    r"appears |seems )?(?P<neg>not )?(?:(?:very|fairly|relatively|quite|rather) )?(?P<a>low|moderate|high|minimal|negligible|small|considerable|substantial)"
    r"|(?P<b>low|moderate|high|minimal|considerable|substantial) (?:degree of |level of )?(?:classifier |classification |"
    r"model |predictive )?uncertainty"
    # the adjective ("the classifier is highly uncertain": a probe's draft for a low-entropy call, session 38)
    r"|(?:is|was|appears|seems|remains|looks) (?P<c>highly|very|quite|moderately|somewhat|slightly|fairly) uncertain"
    # bare, or sure only in part (an outside probe, session 39: "The classifier is uncertain about this result", "only
    # moderately sure" for an entropy of 0.14)
    r"|(?:is|was|appears|seems|remains|looks) (?P<d>uncertain|unsure)\b(?! (?:whether|if))"
    r"|(?P<e>only moderately|moderately|not entirely|not fully|not very) (?:sure|confident|certain)"
    r"|uncertainty (?:is )?(?P<f>near|close to|at) (?:its )?maximum"
)
LEVEL_OF = {"low": "low", "minimal": "low", "negligible": "low", "small": "low", "moderate": "moderate", "high": "high",
            "considerable": "high", "substantial": "high", "highly": "high", "very": "high", "quite": "high",
            "moderately": "moderate", "somewhat": "moderate", "fairly": "moderate", "slightly": "low"}
CONFIDENT = (
    r"clearly|obviously|evidently|unmistakabl[ey]|sure|(?:high|strong|great|considerable) (?:degree of |level of )?confidence|(?:highly |very |quite |fully )?confident(?:ly)?|"
    r"(?:highly |very )?reliabl[ey]|reliability|trustworthy|robust(?:ly)?|(?:highly )?accurate(?:ly)?|"

    r"strongly (?:favou?rs?|suggests?|suggestive|indicat\w*|supports?)|clear(?:ly)? (?:favou?rs?|shows?|demonstrat\w*|"
    r"indicat\w*)|unambiguous(?:ly)?"
)
# a denial right before a claim, within three words ("does not exclude", "cannot be used to exclude")
NOT_BEFORE = re.compile(r"\b(?:not|cannot|can't|never|unable to)\b(?:\W+\w+){0,3}\W*$", re.IGNORECASE)
# a trust word turned into caution right before it ("less reliable", "may not be reliable")
CAUTIOUS_BEFORE = re.compile(r"\b(?:less|limited|reduced|lower|questionable|not|may|might|could)\b[\w\s]{0,12}$",
                             re.IGNORECASE)
FAMILIAR = (r"(?:typical|representative) of the training (?:images|data|set)|(?:resembles?|similar to|like) the "
            r"(?:training (?:images|data)|images the model was trained on)|within the training distribution|in-distribution|"
            r"familiar(?: to the (?:model|classifier|network))?|looks? like the (?:data|images) the model was trained on|"
            # (an outside probe, session 39: "The model has seen images like this one in training" on an unfamiliar one)
            r"(?:has|have) seen (?:images|slices|scans|data|cases|pictures) (?:like|similar to) (?:this|these|it)\b|"
            r"(?:seen|met|encountered) (?:in|during) training|above the familiarity threshold|"
            r"trained on (?:images|slices|data|scans|pictures) (?:like|similar to) (?:this|these|it)\b|"
            r"familiarity[\w\s().,]{0,30}?\b(?:just |well |comfortably )?(?:above|over|exceeds|passes|meets) "
            r"(?:the |its )?(?:\w+ )?threshold")
UNFAMILIAR = (r"unlike the (?:training )?images|unfamiliar|out[- ]of[- ]distribution|outside the training distribution|"
              r"outside the range of the training (?:data|images|set)|"
              r"below the familiarity threshold|familiarity[\w\s().,]{0,30}?\b(?:just |well |far )?(?:below|under|short of) "
              r"(?:the |its )?(?:\w+ )?threshold")

# a number named as one quantity must be that quantity's (an outside probe, session 39: the slice similarity 0.81
# passed as "the atlas placement confidence is 0.81" for a confidence of 0.34; the threshold 0.79 as the score)
# (an outside probe, session 40: "The placement's confidence, 0.85, is high" (the Dice), "The image scores 0.79 for
# familiarity" (the threshold), "brain-mask Dice is 0.82" (the dropped stage's), "out of a maximum of 1.00" passed)
_QUANTITY = (r"(?:atlas |template )?(?:placement|registration)(?:'s|’s)? confidence|(?:placed|matched|registered|made)"
             r"[\w\s]{0,40}? with (?:a )?confidence|familiarity (?:score )?threshold|familiarity(?: score)?|layer score|"
             r"(?:classifier(?:'s)? |classification )?entropy|maximum(?: possible)? entropy|"
             r"(?:registration(?:'s)? |brain[- ]mask |final )*dice(?: (?:overlap|score|coefficient))?|"
             r"(?:placement|registration|slice|template)(?:'s|’s)? (?:similarity|quality)")
QUANTITY_NUMBER = re.compile(
    rf"\b(?P<q>{_QUANTITY})"
    r"(?:\s+(?:here|now|then|for (?:this|the) (?:image|slice|volume|scan|study)))?(?:\s*,)?(?:\s+(?:is|was|of|at|equals|"
    r"reaches|reached|stands at|comes to)|\s*[=:])?\s*\(?(?P<n>\d*\.\d+|\d+)\b(?!\s*%)",
    re.IGNORECASE)
# the number first: "scores 0.79 for familiarity"; the entropy's maximum said alone ("0.57 out of a maximum of 1.00")
QUANTITY_NUMBER_BEFORE = re.compile(
    r"(?<![\d.])(?P<n>\d*\.\d+)\s+(?:for|on|in|as)\s+(?:the\s+|its\s+)?(?P<q>familiarity(?: score)?|layer score|entropy|"
    r"(?:placement|registration) confidence)\b", re.IGNORECASE)
# the cautions denied ("There are no cautions for this volume" for an unfamiliar volume read slice by slice)
CAUTIONS_DENIED = re.compile(r"\b(?:no|without any|without) (?:cautions?|caveats?|warnings?)\b|\bno (?:caution|caveat) "
                             r"(?:applies|is raised|is given)\b", re.IGNORECASE)
# a mask's extent said as its longest or along one axis (an outside probe, session 40: "At its longest, the outlined
# lesion spans 6 mm" (the slice thickness), "The outline's first-axis extent is 23 mm" (the second axis))
EXTENT_LONGEST = re.compile(r"\b(?:longest|widest)\b(?!\s+share)|\b(?:greatest|largest|maximum|maximal|biggest)\s+"
                            r"(?:extent|dimension|diameter|length|axis)\b", re.IGNORECASE)
EXTENT_AXIS = re.compile(r"\b(?:(?P<o>first|second|third)[- ]axis|axis (?P<n>one|two|three|1|2|3)\b)", re.IGNORECASE)
EXTENT_NUMBER = re.compile(r"(?<![\w.])(?P<n>\d+(?:\.\d+)?)\s*(?P<u>mm|cm)\b", re.IGNORECASE)
# a hemisphere's share of the salient area ("69% of the salient area lies in the right hemisphere")
HEMI_SHARE = re.compile(r"(?:(?P<pct>\d+(?:\.\d+)?)\s*(?:%|percent\b)|(?P<word>half|a third|one third|two thirds|a quarter|"
                        r"three quarters))", re.IGNORECASE)
HEMI_WORDS = {"half": 0.5, "a third": 1 / 3, "one third": 1 / 3, "two thirds": 2 / 3, "a quarter": 0.25,
              "three quarters": 0.75}
# the placement confidence against a bound ("above the 0.5 needed to name regions" at 0.47: an outside probe, session 40)
PLACEMENT_BOUND = re.compile(
    r"(?:placement|registration)(?:'s|’s)? confidence[\w\s,()]{0,25}?\b(?P<dir>above|over|exceeds?|exceeding|greater than|"
    r"more than|higher than|at least|below|under|less than|lower than|short of|falls short of)\s+(?:the\s+|a\s+)?"
    r"(?P<n>\d*\.\d+)\b(?!\s*%)", re.IGNORECASE)
ENTROPY_MAXIMUM = re.compile(
    r"\b(?:out of|of|under|below|near|to|than)\s+(?:a|the|its)\s+(?P<q>(?:possible\s+)?maximum|possible|ceiling)(?:\s+(?:possible|value))?"
    r"(?:\s+(?:of|at|is))?\s*\(?(?P<n>\d*\.\d+|\d+)\b(?!\s*%)"
    r"|\b(?P<q2>at most|no more than|cannot exceed|can be at most|maximum of|up to)\s+(?P<n2>\d*\.\d+|\d+)\b(?!\s*%)",
    re.IGNORECASE)
# the entropy as a share of its maximum ("more than half of the maximum possible" for 0.57 of 1.39)
ENTROPY_SHARE = re.compile(r"\b(?P<bound>more than|over|above|at least|less than|under|below|about|roughly|around|nearly|"
                           r"almost|close to|just over|just under)?\s*(?P<frac>half|a third|one third|a quarter|one quarter|"
                           r"two thirds|three quarters|a fifth|\d+(?:\.\d+)?\s*(?:%|percent\b))\s+(?:of\s+)?(?:the|its)\s+"
                           r"(?:(?:possible|theoretical)\s+)?(?:maximum|ceiling|upper bound|largest possible)", re.IGNORECASE)
SHARE_WORDS = {"half": 0.5, "a third": 1 / 3, "one third": 1 / 3, "a quarter": 0.25, "one quarter": 0.25,
               "two thirds": 2 / 3, "three quarters": 0.75, "a fifth": 0.2}

# the atlas placement's confidence said in words (an outside probe, session 39: "the atlas placement is
# high-confidence" at 0.34 passed)
PLACEMENT_LEVEL = (r"(?:placement|registration|position(?:ing)?)(?:[\w\s]{0,25}?)\b(?:is|was|has)\s+(?P<neg>not\s+)?(?:a\s+|of\s+)?"
                   r"(?:(?:very|fairly|rather)\s+)?(?P<a>high|low|good|poor|limited)[- ]confidence|"
                   r"(?P<b>high|low|good|poor)[- ]confidence (?:atlas )?(?:placement|registration|position)|"
                   # (an outside probe, session 40, round 10: "placed on the template with high confidence", "The
                   # registration confidence is low" for a confidence of 0.58)
                   r"(?:placed|matched|registered|positioned)[\w\s]{0,40}?\bwith\s+(?:a\s+)?(?:(?:very|fairly|rather)\s+)?"
                   r"(?P<c>high|low|good|poor)\s+confidence|"
                   r"(?:placement|registration)(?:'s|’s)? confidence (?:is|was|remains)\s+(?P<neg2>not\s+)?"
                   r"(?:(?:very|fairly|rather|quite)\s+)?(?P<d>high|low|good|poor)\b")

CLASS_PATTERNS = {
    # "no tumour (0.03)": the class, named with its probability (an outside probe, session 38: read as a denial)
    "no_tumor": (r"no[-_ ]tumou?r class|no_tumor|tumou?r-free(?: class)?|no[- ]tumou?r(?=\s*[(:=]?\s*(?:p(?:robability)?\s*[=:]?\s*)?"
                 r"[\d.])|(?<=probability of )no[- ]tumou?r|(?<=probability for )no[- ]tumou?r|"
                 r"(?<=and )no[- ]tumou?r(?=,? (?:each|both|have|has|are|at|with)\b)"),
    "pituitary": (r"pituitary (?:tumou?rs?|adenomas?|macroadenomas?|microadenomas?|neoplasms?|lesions?|mass(?:es)?)"
                  r"|adenomas?|pituitary(?! (?:gland|fossa|stalk))"),
    "glioma": r"gliomas?",
    "meningioma": r"meningiomas?",
}
PIPELINE_PHRASES = (r"(?:lesion|tumou?r)[- ](?:mask|location|side|class(?:es)?|probability|probabilities|outlines?|types?|"
                    r"boundary|boundaries|border|borders|margins?|edges?)|"
                    # (an outside probe, session 40: "where the classifier looked, not the tumour's extent" denied it)
                    r"(?:lesion|tumou?r)(?:'s|s'|’s) (?:extents?|size|shape|outlines?|boundary|boundaries|borders?|"
                    r"margins?|edges?|location|position)|(?:lesion|tumou?r) (?:extents?|size|shape|location|position)|"
                    r"(?:outlined|segmented) (?:lesion|tumou?r)|no-tumou?r|other (?:tumou?r )?(?:types|classes)")
# a statement of absence attributed to the classifier ("No tumour was detected by the classifier", "the model finds no
# tumour", "no tumour class is favoured")
ATTRIBUTED = re.compile(r"classifier|classif(?:ied|ication)|\bmodel\b|network|automated|algorithm|detect(?:ed|s|ion)?|"
                        r"favou?r|probabilit|predict|\bclass\b|segment|outlin|\bcalls?\b|according", re.IGNORECASE)
TUMOUR_WORDS = r"tumou?rs?|mass(?:es)?|lesions?|neoplasms?|neoplastic|growths?|abnormalit(?:y|ies)|malignan\w*|cancer"
SIZE_WORDS = re.compile(r"\b(?:measur\w*|diameters?|dimensions?|sizes?|sized|long|across|axis|axes|extent|spans?|spanning|wide|"
                        r"width|length|thick\w*|large|big|small)\b", re.IGNORECASE)
NORMAL_CLAIM = (r"(?:normal|unremarkable) (?:brain )?(?:study|scan|examination|exam|mri|brain|appearances?|findings)"
                r"|healthy brain"
                r"|(?:study|scan|examination|exam|mri|brain|image|findings?|appearances?) (?:is|are|appears?|looks?|seems?) "
                r"(?:entirely |otherwise |essentially |completely )?(?:normal|unremarkable)")
# (the same, denied in other words: "remains to one side of the midline")
ONE_SIDE_OF_MIDLINE = r"(?:to|on) (?:one|a single) side of the midline|(?:stays|remains|lies) unilateral"
CROSSING = (r"cross(?:es|ing|ed)? (?:over )?(?:the )?midline|midline[- ]crossing|"
            r"(?:extends?|extending|spreads?) (?:across|over) the midline|across the midline")
# "left" as a verb's participle ("the mask is left empty") is no side
SIDE = (r"(left|right)(?![ ](?:empty|blank|out|unchanged|behind|over|undone|unnamed|unfilled|as it is)\b)"
        r"(?:[- ]sided|[- ]hemispher(?:e|ic))?|bilateral(?:ly)?|both hemispheres|both sides(?: of the (?:brain|midline))?|"
        r"midline")
# the centre of the area on a side ("the centre of the salient area lies in the right hemisphere"), the input's kind
CENTRE_SIDE = (r"(?:centre|center|centroid)(?: of (?:the|its) [\w\s-]{0,25}?)?\s+(?:lies|is|sits|falls|located)\s+"
               r"(?:in|on|to)\s+the\s+(?P<side>left|right)(?:\s+(?:hemisphere|side))?")
# the centre's MNI coordinates, signed (an outside probe, session 40: "(10, -28, 20)" and "x = +10 mm" passed for a
# centroid at x = -10: every number was looked up unsigned)
_SIGNED = r"[+\-\u2212]?\s?\d+(?:\.\d+)?"
CENTRE_WORDS = re.compile(r"\b(?:centre|center|centroid|centred|centered|coordinates?)\b", re.IGNORECASE)
CENTRE_TRIPLE = re.compile(rf"\(\s*(?P<x>{_SIGNED})\s*(?:mm)?\s*,\s*(?P<y>{_SIGNED})\s*(?:mm)?\s*,\s*(?P<z>{_SIGNED})"
                           r"\s*(?:mm)?\s*\)")
CENTRE_AXIS = re.compile(rf"\b(?P<axis>[xyz])\s*(?:=|:|of)\s*(?P<v>{_SIGNED})(?:\s*mm\b)?", re.IGNORECASE)
CENTRE_TOL_MM = 1.5  # the record gives 0.1 mm; a report rounds to whole millimetres
INPUT_KIND = (r"(?P<vol>(?:read|classified|analysed|analyzed|processed) slice by slice|(?:a |the )?(?:full |whole )?"
              r"(?:3-?d|three-dimensional|volumetric) (?:volume|study|scan|acquisition|dataset)|"
              r"(?<!one of )(?<!of )(?:several|multiple|many) slices|multi-?slice)|"
              r"(?P<flat>(?:a |the )?(?:single )?(?:2-?d|two-dimensional) (?:image|slice|picture))")
# words before a side that say the lesion is on that side alone ("confined to the left hemisphere")
ONLY_SIDE = (r"\b(?:confined|limited|restricted|entirely|exclusively|solely|only|purely|wholly|unilateral(?:ly)?|"
             r"(?:nearly|almost|virtually|practically) all)"
             r"\b[\w\s,-]{0,25}$")

# words after a side that make it the only one ("the right hemisphere only", "the left and does not cross")
ONLY_SIDE_AFTER = r"^[\w\s-]{0,20}?\b(?:only|alone|exclusively|solely)\b|^\s+of the midline"
# words before a side that say most of the lesion is there
MAIN_SIDE = (r"\b(?:mainly|mostly|predominantly|largely|chiefly|primarily|principally|centred|centered|based|"
             r"favou?r(?:s|ing)?)\b[\w\s,-]{0,25}$")
# the same said after the side ("right-predominant", "right more than left", "the right side holds most")
MAIN_SIDE_AFTER = (r"^(?:[\s-]+side)?[\s-]*(?:predominan\w*|dominan\w*|heavy|weighted|more than|greater than|>|"
                   r"holds? (?:most|the (?:largest|greater|larger|bulk)))")
# the same said as a share, of a side ("its largest share in the right hemisphere"; of a region it names the region)
MAIN_SHARE = (r"\b(?:largest (?:share|part|portion)|most of (?:it|the \w+)|majority|bulk|greater (?:part|share)|"
              r"larger (?:part|share))\b[\w\s,-]{0,25}$")
# a size said in words: a small-family word needs the lesion's largest extent under SMALL_MM (under 10 mm for
# "subcentimetre"), a large-family word at least LARGE_MM; neither can be said without a size in mm (an outside
# probe, session 38: "tiny", "small" and "subcentimetre" passed for a lesion 97 mm long)
SMALL_MM, LARGE_MM = 20.0, 30.0
SIZE_ADJECTIVE = (r"(?P<small>tiny|small|little|minute|minuscule|subcentimet(?:re|er)|sub-centimet(?:re|er))|"
                  r"(?P<large>large|big|bulky|massive|huge|giant|sizeable|sizable|extensive|enormous)")
LESION_NOUN = r"(?:lesions?|mass(?:es)?|tumou?rs?|gliomas?|meningiomas?|adenomas?|macroadenomas?|neoplasms?|growths?|foci|focus)"
_ANY_SIZE = re.sub(r"\?P<\w+>", "", SIZE_ADJECTIVE)
SIZE_SAID = re.compile(rf"\b(?:{_ANY_SIZE})(?:[\s,-]+\w+){{0,2}}?[\s-]+{LESION_NOUN}\b|"
                       rf"\b{LESION_NOUN}\b[\w\s,]{{0,30}}?\b(?:is|are|appears?|looks?|seems?|measures?)\s+"
                       rf"(?:\w+\s+)?(?:{_ANY_SIZE})\b", re.IGNORECASE)
# the report is read in English: other languages' common words (an outside probe, session 38: side, location,
# number of lesions and treatment in German, French and Italian passed unread). One of the first kind is
# enough; the second kind are also English words or names, so two are needed
FOREIGN_WORDS = re.compile(
    r"\b(?:der|das|und|oder|mit|ist|sind|nicht|kein|keine|eine|einer|einem|liegt|rechts|links|rechten|linken|"
    r"mehrere|empfohlen|empfehlung|ehesten|wahrscheinlich|läsion\w*|gliom|befund\w*|"
    r"les|une|est|sont|avec|dans|gauche|droite?|plusieurs|recommandée?s?|lésions?|probablement|"
    r"della|delle|nel|nella|nei|sono|destr[oa]|sinistr[oa]|lesione|lesioni|"
    r"los|las|derech[oa]|izquierd[oa]|lesión|lesiones)\b", re.IGNORECASE)
FOREIGN_WEAK = re.compile(r"\b(?:die|den|dem|des|im|la|le|du|et|il|lo|gli|el|del|con|por|un|una)\b", re.IGNORECASE)
# common number words, turned into digits before the numbers are checked ("twenty-five millimetres")
_UNITS_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                "sixteen seventeen eighteen nineteen").split()
_TENS_WORDS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
NUMBER_WORD = re.compile(rf"\b(?:(?P<tens>{'|'.join(_TENS_WORDS)})(?:[- ](?P<unit>{'|'.join(_UNITS_WORDS[1:10])}))?|"
                         rf"(?P<small>{'|'.join(_UNITS_WORDS)})|(?P<hundred>one hundred|a hundred|hundred))\b"
                         rf"(?=\s*(?:%|percent|per cent|mm|cm|millimet|centimet|ml|millilit|times|out of|in \d|"
                         rf"pixels?|voxels?|square|cubic))", re.IGNORECASE)
# units written out, to the symbols the findings use
UNIT_WORDS = [(r"\bsquare millimet(?:re|er)s?\b", "mm2"), (r"\bsquare centimet(?:re|er)s?\b", "cm2"),
              (r"\bcubic millimet(?:re|er)s?\b", "mm3"), (r"\bcubic centimet(?:re|er)s?\b|\bcc\b", "cm3"),
              (r"\bmillimet(?:re|er)s?\b", "mm"), (r"\bcentimet(?:re|er)s?\b", "cm"), (r"\bmillilit(?:re|er)s?\b", "ml"),
              (r"\bper cent\b", "percent")]


def _word_value(word: str) -> int:
    w = word.lower()
    if "hundred" in w:
        return 100
    return _UNITS_WORDS.index(w) if w in _UNITS_WORDS else 10 * (_TENS_WORDS.index(w) + 2)


def normalise(text: str) -> str:
    """The text the claims are read in: Unicode compatibility forms (no-break spaces, superscripts) folded,
    words broken across a line joined, number words and written-out units turned into digits and symbols,
    "p=.96" given its zero, and odds ("nine times out of ten") turned into a percentage."""
    t = unicodedata.normalize("NFKC", text)
    t = re.sub(r"(\w)-\s*\n\s*(\w)", r"\1-\2", t)
    t = re.sub(r"\s+", " ", t)

    def number(m: re.Match) -> str:
        if m.group("tens"):
            v = 10 * (_TENS_WORDS.index(m.group("tens").lower()) + 2)
            return str(v + (_UNITS_WORDS.index(m.group("unit").lower()) if m.group("unit") else 0))
        if m.group("small"):
            return str(_UNITS_WORDS.index(m.group("small").lower()))
        return "100"

    t = NUMBER_WORD.sub(number, t)
    t = re.sub(rf"\b(out of|in) ({'|'.join(_UNITS_WORDS[1:] + _TENS_WORDS)}|a hundred|one hundred)\b",
               lambda m: f"{m.group(1)} {_word_value(m.group(2))}", t, flags=re.IGNORECASE)  # "nine out of ten"
    t = re.sub(r"\b(?:a )?half (?:a |an )?(?=(?:mm|cm|millimet|centimet))", "0.5 ", t, flags=re.IGNORECASE)
    for pat, unit in UNIT_WORDS:
        t = re.sub(pat, unit, t, flags=re.IGNORECASE)
    t = re.sub(r"(?<![\w.])\.(\d)", r"0.\1", t)
    t = re.sub(r"(\d)\s*(?:mL|ML|Ml)\b", r"\1 ml", t)
    t = re.sub(r"\b(\d+) (?:times |chances? |cases? )?(?:out of|in) (\d+)\b",
               lambda m: f"{100 * int(m.group(1)) / max(int(m.group(2)), 1):g} %", t)
    return t


def odd_characters(text: str) -> list[str]:
    """Letters outside plain English text and invisible characters: a lookalike letter ("rіght" with a Ukrainian
    i) or a zero-width space hides a word from every check, and accented letters are another language's."""
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat == "Cf" or (ch.isalpha() and not ch.isascii() and ch not in "µ"):
            out.append(f"U+{ord(ch):04X} {unicodedata.name(ch, '?').lower()}")
    return list(dict.fromkeys(out))


# broad anatomical terms -> key; a region of the findings supports the keys in BROAD_OF
BROAD = {
    "frontal": r"frontal(?: lobes?| regions?)?|fronto-?parietal|fronto-?temporal",
    "temporal": r"temporal(?: lobes?| regions?)?|temporo-?parietal|temporo-?occipital|fronto-?temporal",
    "parietal": r"parietal(?: lobes?| regions?)?|parieto-?occipital|temporo-?parietal|fronto-?parietal",
    "occipital": r"occipital(?: lobes?| regions?)?|parieto-?occipital|temporo-?occipital",
    "insula": r"insula|insular(?: region)?",
    "cingulate": r"cingulate|limbic",
    "basal ganglia": r"basal ganglia|lentiform|striatum|deep gr[ae]y matter",
    "thalamus": r"thalam(?:us|ic|i)",
    "hippocampus": r"hippocamp(?:us|al|i)|mesial temporal|medial temporal",
    "brain stem": r"brain ?stem|pons|pontine|midbrain|medulla(?: oblongata)?|infratentorial",
    "cerebellum": r"cerebell(?:um|ar)|posterior fossa|vermis|dentate nucle(?:us|i)",
    "third or fourth ventricle": r"(?:third|fourth|3rd|4th) ventricles?",  # the atlas has the lateral ventricles only
    "ventricle": r"(?:peri|intra)?ventricular|ventricles?",
    "corpus callosum": r"corpus callosum|callosal",
    "white matter": r"white matter|subcortical",
    "cortex": r"cortical|cortex|cortices|gyri|gyrus|sulc(?:us|i)",
    "sellar": r"(?:supra|para|intra)?sellar|sella(?: turcica)?|pituitary (?:gland|fossa|stalk)|cavernous sinus|optic chiasm|hypothalam\w*",
    "supratentorial": r"supratentorial|cerebral hemispheres?",
}


def _base(name: str) -> str:
    """'cingulate gyrus, anterior division' -> 'cingulate gyrus'; parentheses dropped."""
    s = re.sub(r"\(.*?\)", "", name.lower())
    s = re.sub(r",.*$", "", s)
    return re.sub(r"\s+", " ", s).strip()


# readable variants of atlas region names
_VARIANTS = {
    "insular cortex": ["insular cortex"],
    "precuneous cortex": ["precuneous cortex", "precuneus"],
    "brain stem": [],  # broad term
    "juxtapositional lobule cortex": ["juxtapositional lobule(?: cortex)?", "supplementary motor (?:area|cortex)", "sma"],
    # functional names of atlas regions (an outside probe, session 38: "motor strip", "M1", "Broca's area" passed)
    "precentral gyrus": ["precentral gyrus", "motor strip", "primary motor (?:cortex|area)", "m1"],
    "postcentral gyrus": ["postcentral gyrus", "sensory strip", "primary (?:somato)?sensory (?:cortex|area)", "s1"],
    "inferior frontal gyrus": ["inferior frontal gyrus", "broca'?s area", "broca'?s region", "pars triangularis",
                               "pars opercularis"],
    "intracalcarine cortex": ["intracalcarine cortex", "primary visual (?:cortex|area)", "striate cortex", "v1"],
    "heschl's gyrus": ["heschl'?s? gyrus", "gyrus of heschl", "transverse temporal gyr(?:us|i)", "primary auditory (?:cortex|area)",
                       "a1"],
    "caudate": ["caudate(?: nucleus)?"],
    "pallidum": ["(?:globus )?pallidus", "pallidum"],
    "accumbens": ["(?:nucleus )?accumbens"],
    "lateral ventricle": ["lateral ventricles?"],
    "thalamus": [],
    "hippocampus": [],
}


def _broad_keys_of(base: str, label: str) -> set[str]:
    keys = set()
    if " pars " in base:
        keys.add(base.split(" pars ")[0])
    for lobe in ("frontal", "temporal", "parietal", "occipital"):
        if lobe in base:
            keys.add(lobe)
    if any(w in base for w in ("cortex", "gyrus", "pole", "lobule", "cuneus", "operculum")):
        keys.add("cortex")
    table = {
        "frontal": ("precentral", "juxtapositional", "subcallosal", "paracingulate", "central opercular"),
        "parietal": ("postcentral", "supramarginal", "angular", "precuneous", "central opercular"),
        "occipital": ("cuneal", "lingual", "calcarine"),
        "temporal": ("hippocampus", "parahippocampal", "amygdala", "planum", "heschl"),
        "insula": ("insular",),
        "cingulate": ("cingulate",),
        "basal ganglia": ("caudate", "putamen", "pallidum", "accumbens"),
        "thalamus": ("thalamus",),
        "hippocampus": ("hippocampus", "parahippocampal"),
        "brain stem": ("brain stem",),
        "ventricle": ("ventricle",),
    }
    for key, words in table.items():
        if any(w in base for w in words):
            keys.add(key)
    if label == "Unlabelled_White_Matter_Or_Other":
        keys = {"white matter"}
    elif "brain stem" not in keys:
        keys.add("supratentorial")
    return keys


@lru_cache(maxsize=1)
def region_lexicon() -> tuple[tuple[str, str], ...]:
    """(base name, regex) for every atlas region, longest first."""
    try:
        from tumorlens.atlas.harvard_oxford import labels, readable_name

        names = {_base(readable_name(lab)) for lab in labels() if lab}
    except Exception:  # noqa: BLE001 - the atlas wheel is optional for reading reports
        names = set()
    out = []
    for n in names:
        variants = _VARIANTS.get(n, [re.escape(n)])
        for v in variants:
            out.append((n, v))
        if " pars " in n:  # "inferior frontal gyrus" names both of its parts
            short = n.split(" pars ")[0]
            out.extend((short, v) for v in _VARIANTS.get(short, [re.escape(short)]))
    return tuple(sorted(set(out), key=lambda kv: (-len(kv[1]), kv[1])))


# The words a verified sentence may be made of, beyond what the checks above recognise as claims (classes, regions,
# sides, numbers, uncertainty, ...) and the words of the findings' own template report. A list of what is wrong
# cannot be complete: an outside probe's second round (session 38) got 41 % of 474 new unsupported drafts through
# ("craniotomy", "IDH-mutant", "vermis", "harmless", "on the patient's right" ...). So a sentence is verified only when
# every word is one of these, of the template's, or part of a checked claim; anything else is named, unverified.
GROUNDED_WORDS = frozenset("""
a an the this that these those it its they them their there here which who whose what where when while whereas
of in on at to from by with within without into onto over under across along between among around about above below
beside besides near through throughout per via as than like unlike and or nor but yet so also both either neither
each every all any some most more less least much many few several other others another such same only just even
is are was were be been being am has have had having does do did done can could may might must should would will
shall not no none nothing neither whether if then thus therefore hence however although though because since
given due owing according towards toward up down out off overall mainly mostly largely partly partially
predominantly primarily chiefly principally entirely wholly fully largest larger smaller smallest share part parts
portion proportion fraction percentage per cent percent whole rest remainder
image images slice slices volume volumes scan scans study studies mri input picture file examination exam
finding findings impression impressions technique recommendation recommendations limitation limitations report
classifier classification classifiers model models network prediction predicted predicts predict output result
results probability probabilities probable probably likely likelihood unlikely possible possibly possibility
most-likely favour favours favoured favouring favor favors favored favoring prefer prefers preferred choice
leading top first second third ranked ranks rank highest lower higher low moderate high level levels degree
consistent compatible suggestive suggest suggests suggesting suggested indicate indicates indicating indicated
supports support supported points point pointing keeping keep line
class classes category categories label labels type types diagnosis diagnoses differential alternative
alternatives considered consider considering
tumour tumours tumor tumors lesion lesions mass masses
segmentation segmented head outline outlines outlined outlining mask masks contour delineated delineates drawn
saliency salient area areas map maps heatmap heat heatmaps looked look looks looking attended attention focus
focused focuses focusing highlights highlighted highlighting drove driven method methods
region regions atlas atlases template anatomical anatomy structure structures named naming name
located location locations lies lie lying sits sitting situated placed placement position positioned centred
centered centre center involves involve involving involved extends extend extending extent spans span spanning
covers cover covering covered contains contain containing includes include including holds hold holding
left right hemisphere hemispheres side sides midline bilateral both crosses cross crossing
size sizes measures measure measuring measured measurement measurements area volume approximately about roughly
around nearly almost some voxel voxels pixel pixels mm cm ml mm2 mm3 cm2 cm3 millimetres millimeters
x by dimensions dimension extent extents long wide across
uncertainty uncertain certainty confidence confident entropy unsure sure
familiar familiarity unfamiliar unlike training trained resembles resemble resembling
review reviewed reviewing radiologist radiologists radiology expert specialist clinician clinicians clinical
correlation correlate correlated correlating compare compared comparison full original
recommend recommends recommended recommendation advised advise advisable needed need needs required requires
before after any decision decisions confirm confirmation unconfirmed caution cautious carefully careful
interpreted interpret interpretation read reading reads seen see shown show shows showing demonstrates
demonstrated demonstrate appears appear appearing appearance identified identify detected detect found present
presence absent absence evidence sign signs feature features reported reports reporting described describes
describe given gives give says say said stated states state noted notes note observed observes
yes automatic automated computer computed software tool ai artificial intelligence
receives receive classified finds leans means fell comes essential information axial coronal sagittal half single
empty next step steps split provided maximum performed kept stage stages assessment strongly upon one two three four received
far residual details typical ahead expressed converted localisation localization localised localized greatest considerably times account
accounts score scores similar similarly widespread corresponding corresponds correspond together context sequences
sequence qualified further history pathology relied rely relies kindly conclusion necessarily retains retain wrong
represents represent representing fairly differs differ data window opinion changed affine deformable dice small
large share shares
comprises comprise comprising leads lead leading view runner exceeds exceed exceeding dominated dominates dominate
trails trail apiece comfortably passes apart runs withheld checked accompanied value softmax ceiling layer layers inner
cannot main made make makes thick thickness itself fourth dimensional took seems seem light
slightly falls fall set validation direction directions alone places place goes go
stands stand negligible despite occupies occupy axis isotropic straddles straddle little used own
taken enough too registered sex reflect reflects reflecting thickness count supplied handled
vs versus year years old aged age patient patients space coordinate coordinates centroid confined limited restricted
rule rules disease diseases for neuroradiologist neuroradiologists alongside remains remain remaining please excluded exclude unreliable
reliable analysed analyzed analysis assigns assign assigned plane planes known unknown laterality determined
determine call calls available unavailable likeliest predominant threshold distant reaches reach reached
followed follows follow complete completely very negative positive undetermined unclear clear
therefore accordingly again still note summary overall whereas instead rather both neither
""".split())


# capitalised words of the product's own, never a person's name
PRODUCT_WORDS = {
    "mni", "mni152", "harvard", "oxford", "harvard-oxford", "grad", "cam", "grad-cam", "scorecam", "score-cam",
    "tumorlens", "densenet", "monai", "label", "slicer", "magnetic", "resonance", "imaging", "tesla", "who",
    "world", "health", "organization", "tip-adapter", "clip", "tumorclip", "minilm", "the", "a", "an", "this",
    "these", "that", "no", "not", "left", "right", "brain", "lesion", "tumour", "tumor", "mri", "image", "findings",
    "impression", "technique", "recommendations", "limitations", "classifier", "segmentation", "saliency",
    "radiologist", "review", "clinical", "atlas", "template", "region", "regions", "gyrus", "cortex", "lobe",
}

# "a radiologist should confirm", "rather than confirming": a certainty word asked of a reader, claimed by no one
RECOMMENDING = re.compile(r"\b(?:should|must|to|may|can|could|would|please|radiologist|rather than|before|until|"
                          r"needs?|required)\b[\w\s]{0,20}$", re.IGNORECASE)

# asking the reader to compare with earlier imaging states no change (a probe's false alarm, session 38)
COMPARE_WITH = re.compile(r"\b(?:correlat(?:e|ion|ing)|compare|comparing|comparison|review|reviewing|check|checking|"
                          r"read|reading|interpret|interpreting|interpretation)\b[\w\s,]{0,45}$",
                          re.IGNORECASE)

# ---- results ----------------------------------------------------------------------------------------

SEX_WORDS = r"woman|women|female|lady|girl|she|her|hers|herself|man|men|male|gentleman|boy|he|him|his|himself"
# a sentence that attributes what it says to the saliency map, not to the lesion
SALIENT_WORDS = re.compile(r"salien|classifier looked|model looked|where the (?:classifier|model|network) looked|"
                           r"attention|grad-?cam|score-?cam|saliency|heat ?map", re.IGNORECASE)
# a sentence stating why the patient was imaged: what follows must be in the clinical history, not negated there
PRESENTATION = (r"(?:presents|presenting|presented|admitted|referred|imaged) (?:with|for)|complains? of|"
                r"suffer(?:s|ing)? from|(?:a|with a|known|prior|previous) history of")
_CLINICAL_FILLER = {"with", "from", "new", "onset", "recent", "several", "weeks", "days", "months", "years", "history",
                    "known", "patient", "some", "mild", "severe", "acute", "chronic", "episodes", "episode"}
FEMALE_WORDS = {"woman", "women", "female", "lady", "girl", "she", "her", "hers", "herself"}

# likelihood words checked against the probabilities (an outside probe's drafts, session 36: "meningioma excluded"
# and "not a meningioma" at 0.37, "very likely" at 0.55, "equally likely" at 0.96 against 0.01)
RULED_OUT_MAX = 0.2  # a class this probable may be called less likely, not excluded
STRONG_MIN = 0.8  # "very likely", "almost certainly" need this much
STRONG_LIKELIHOOD = re.compile(r"\b(?:very|highly|extremely|overwhelmingly)\s+(?:likely|probable)|"
                               r"\balmost\s+certain(?:ly)?|\bvirtually\s+certain(?:ly)?|\bmost\s+certainly", re.IGNORECASE)
DIFFERENTIAL_MIN = 0.1  # a class offered as the alternative in "glioma or meningioma" needs this much
# what joins class names into one differential: "glioma or meningioma", "glioma, meningioma or pituitary tumour",
# "glioma/meningioma" (a list joined by "and" only is not one)
DISJUNCTION_LINK = re.compile(r"\s*(?:\([^()]*\)\s*)?(?:,\s*or|,|or|/)\s*(?:(?:an?|the|possibly|perhaps|else|alternatively)"
                              r"\s+)*", re.IGNORECASE)
# words that offer a class as a possibility rather than assert it: such a class needs DIFFERENTIAL_MIN too (an outside
# probe, session 37: "glioma cannot be excluded", "differential: glioma", "versus glioma" passed at p 0.008)
DIFFERENTIAL_CUE = re.compile(r"\bdifferential|\bddx\b|\bversus\b|\bbetween\b|\bover\b|\bprobability (?:of|for)\b|"
                              r"\bchance of\b|\blikelihood of\b|\bvs\.?(?=\s)|\balternatives?\b|\balternatively\b|"
                              r"\bconsider(?:ed|ation)?\b|\bcannot be (?:excluded|ruled out)|\bnot (?:be )?(?:excluded|ruled out)|"
                              r"\bpossib(?:le|ly|ility)\b", re.IGNORECASE)
# words before a region that give it most of the lesion, or its largest share; and the same said after it
MAIN_REGION = re.compile(r"\b(?:most of|majority of|bulk of|mainly|mostly|predominantly|chiefly|primarily|largely|"
                         r"principally|(?:the )?largest (?:share|part|portion))\b[\w\s,'%().-]{0,45}$", re.IGNORECASE)
_HOLDS = r"(?:holds?|accounts? for|has|contains?|takes?|makes? up|covers?|represents?|comprises?)"
LARGEST_AFTER = re.compile(rf"^[\w\s]{{0,20}}?\b{_HOLDS}\s+(?:the\s+)?(?:largest|greatest|biggest|most)"
                           r"(?:\s+(?:share|part|portion))?\b", re.IGNORECASE)
# a share given to a region right after its name ("the left thalamus accounts for 12 % of the salient area")
REGION_SHARE_AFTER = re.compile(rf"^[\w\s,]{{0,25}}?\b{_HOLDS}\s+(?:about |roughly |approximately |around |nearly |some |"
                                r"only |just )?(?P<pct>\d+(?:\.\d+)?)\s*(?:%|percent\b)", re.IGNORECASE)

REGION_SHARE_BEFORE = re.compile(r"(?P<pct>\d+(?:\.\d+)?)\s*(?:%|percent\b)\s+of (?:the \w+(?: \w+)?|it|its \w+)\s+"
                                 r"(?:is|lies|sits|falls|was)\s+(?:with)?in\s+(?:the\s+)?(?:(?:left|right)\s+)?$",
                                 re.IGNORECASE)
# a region's rank by share ("the right putamen holds the third largest share")
# (and, an outside probe, session 40: "is the second-largest region", "ranks third", "is among the top three regions")
REGION_RANK_AFTER = re.compile(rf"^[\w\s,]{{0,20}}?\b(?:(?:{_HOLDS}|is|was)\s+(?:the\s+)?(?P<ord>second|third|fourth|fifth)"
                               r"[- ](?:largest|greatest|biggest)|(?:ranks?|comes?)\s+(?P<ord2>second|third|fourth|fifth)\b|"
                               r"(?:is|was|ranks?)\s+(?:among|in|one of)\s+the\s+(?:top|largest|leading|biggest)\s+"
                               r"(?P<top>two|three|four|five|2|3|4|5)\b)", re.IGNORECASE)
# two regions compared ("the right thalamus holds a larger share of the salient area than the left thalamus")
REGION_MORE = re.compile(rf"\b{_HOLDS}\s+(?:a\s+|an\s+|slightly\s+|much\s+|far\s+)?(?P<dir>larger|greater|bigger|more|"
                         r"smaller|less|lesser|fewer)\b[\w\s]{0,30}?\bthan\b", re.IGNORECASE)

# a class's rank said in words, before or after its name
RANK_BEFORE = re.compile(r"\b(?P<rank>second|third|least|next)(?:[- ]most)?\s+(?:likely|probable)\s+(?:class|diagnosis|option)?"
                         r"\s*(?:is|was)?\s*(?:an?\s+|the\s+)?$", re.IGNORECASE)
RANK_AFTER = re.compile(r"^\W*(?:class\s+)?(?:is|was|remains|ranks?|comes?)?\s*(?:the\s+)?(?P<rank>second|third|least|next)"
                        r"(?:(?:[- ]most)?\s+(?:likely|probable)|(?=\s*(?:[,.;)]|$|(?:at|with|place|in|among)\b)))",
                        re.IGNORECASE)
# the two masks compared (an outside probe, session 39: "the outlined lesion is larger than the salient area", "about
# five times", "about a third", "do not overlap" passed unchecked): the nouns, and what is said of their sizes
OUTLINE_NOUN = re.compile(r"\b(?:(?:lesion|tumou?r) outline|outlined (?:lesion|tumou?r|area)|segment(?:ed|ation) "
                          r"(?:lesion|tumou?r|outline|mask|area)|segmentation head(?:'s)? (?:outline|mask|lesion)|"
                          r"(?<!salient )outline|lesion(?:'s)?|tumou?r(?:'s)?)\b", re.IGNORECASE)
SALIENT_NOUN = re.compile(r"\b(?:salient area|saliency (?:mask|area|map)|(?:grad-cam\+*|score-cam)(?: map's)?(?: salient)? "
                          r"(?:area|mask))", re.IGNORECASE)
FRACTION_WORDS = {"half": 0.5, "a third": 1 / 3, "one third": 1 / 3, "a quarter": 0.25, "one quarter": 0.25,
                  "a fifth": 0.2, "one fifth": 0.2, "an eighth": 0.125, "one eighth": 0.125, "a tenth": 0.1,
                  "one tenth": 0.1, "two thirds": 2 / 3, "three quarters": 0.75}
_FRACTION = "|".join(sorted(FRACTION_WORDS, key=len, reverse=True))
_BOUND = r"\b(?P<{}>less than|fewer than|under|below|more than|over|above|at least|at most|up to)\s+(?:about |roughly )?"
MASK_COMPARISON = re.compile(
    r"(?P<of_two>\b(?:is|being|was) the (?:larger|bigger|greater|smaller|lesser) of the two\b)|"
    r"(?P<overlap_none>\b(?:do|does|did) not (?:overlap|coincide|meet|touch)|\bno overlap\b|\bdisjoint\b|\bapart from each other)|"
    r"(?P<within>\b(?:lies?|sits?|falls?|is|are) (?:entirely |wholly |completely |fully )?(?:within|inside)\b)|"
    r"(?P<same>\b(?:(?:about |roughly |nearly )?(?:the )?(?:same|similar|comparable|equal) (?:in )?(?:size|extent|area|volume)|"
    r"(?:about|roughly|nearly|just) as (?:large|big|extensive)|match(?:es)? in size)\b)|"
    rf"(?P<times>(?:{_BOUND.format('bound_t')})?(?:(?P<n>\d+(?:\.\d+)?)(?P<and_half> and a half)?\s*(?:times|x(?!\s*\d)|-fold|fold)\b|"
    r"\btwice\b|\bthrice\b))|"
    rf"(?P<fraction>(?:{_BOUND.format('bound_f')})?\b(?:{_FRACTION})\b(?=\s+(?:of|the|as|that|its|size)\b))|"
    r"(?P<extent_more>\b(?:extends? (?:further|farther|beyond)|wider|longer|broader)\b)|"
    r"(?P<extent_less>\b(?:extends? less far|narrower|shorter)\b)|"
    r"(?P<more>\b(?:larger|bigger|greater|more extensive|exceeds?|exceeding|outsizes?)\b)|"
    r"(?P<less>\b(?:smaller|less extensive|lesser)\b|\bless than\b)", re.IGNORECASE)
EQUALLY_LIKELY = re.compile(r"\b(?:equally|just\s+as)\s+(?:likely|probable)|\bas\s+likely\s+as\b", re.IGNORECASE)


@dataclass
class Claim:
    field: str
    kind: str  # region | side | class | tumour | crossing | unmeasured | trust | number | structured | identifier | patient
    text: str
    sentence: str
    negated: bool
    uncertain: bool
    ok: bool
    conflict: bool = False  # a negated (or normal-study) statement that contradicts the findings
    reason: str = ""


# inflections a grounded word may take (the template's "lies" grounds "lying"); only real endings are stripped: any
# last one to three letters had been, and "link" passed as "lie" + "nk" (an outside probe, session 40)
_SUFFIXES = (("ies", ("y",)), ("ied", ("y",)), ("ing", ("", "e")), ("es", ("", "e")), ("ed", ("", "e")),
             ("er", ("", "e")), ("est", ("", "e")), ("ly", ("",)), ("s", ("",)), ("d", ("",)))


def _stems(w: str) -> set[str]:
    out = set()
    for suffix, adds in _SUFFIXES:
        if w.endswith(suffix):
            base = w[:-len(suffix)]
            out |= {base + a for a in adds}
            if len(base) >= 2 and base[-1] == base[-2]:  # "mapped" -> "map"
                out.add(base[:-1])
    return out


def _mask(s: str, a: int, b: int) -> str:
    return s[:a] + " " * (b - a) + s[b:]


@lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(rf"(?<![\w-])(?:{pattern})(?![\w])", flags=re.IGNORECASE)


def _iter(pattern: str, text: str):
    return _compiled(pattern).finditer(text)


@lru_cache(maxsize=1)
def _region_any() -> str:
    """One alternation of every atlas region name (a sentence is scanned once, not once per region)."""
    return "|".join(pat for _base_name, pat in region_lexicon())


class Verifier:
    """Claims of a report vs. one :class:`Facts`; :meth:`check` returns the verification dict."""

    def __init__(self, facts: Facts):
        self.f = facts
        self.keys: set[str] = set()
        self.pairs: set[tuple[str, str]] = set()
        self.region_keys: list[set[str]] = []  # the names and broad terms each region of the findings answers to
        for r in facts.regions:
            base = _base(r["name"])
            ks = {base} | _broad_keys_of(base, r["label"])
            self.region_keys.append(ks)
            self.keys |= ks
            self.pairs |= {(r["hemisphere"], k) for k in ks}
        if facts.label == "pituitary":
            self.keys.add("sellar")
            self.pairs |= {("midline", "sellar")}

    # ---- per sentence -------------------------------------------------------------------------
    def _sentence(self, field: str, sent: str) -> list[Claim]:
        f = self.f
        claims: list[Claim] = []
        self._quantity_spans: list[tuple[int, int]] = []  # numbers named as a quantity, checked as that
        neg_text = sent
        for m in _iter(CLASS_PATTERNS["no_tumor"] + "|" + PIPELINE_PHRASES, sent):
            neg_text = neg_text[:m.start()] + "x" * (m.end() - m.start()) + neg_text[m.end():]
        scope = SentenceScope(neg_text)
        scan = sent

        def add(kind: str, m: re.Match, ok: bool, reason: str = "", conflict: bool = False, pol=None) -> Claim:
            pol = pol or scope.polarity(m.start(), m.end())
            c = Claim(field, kind, m.group(0), sent.strip(), pol.negated, pol.uncertain, ok, conflict, reason)
            claims.append(c)
            return c

        # 1. features nothing measured
        for name, pat in UNMEASURED.items():
            for m in _iter(pat, scan):
                pol = scope.polarity(m.start(), m.end())
                if name == "change since earlier imaging" and COMPARE_WITH.search(scan[:m.start()]):
                    add("unmeasured", m, True, "asks to compare with earlier imaging", pol=pol)
                    scan = _mask(scan, m.start(), m.end())
                    continue
                if name == "certainty" and (CAUTIOUS_BEFORE.search(scan[:m.start()]) or RECOMMENDING.search(
                        scan[:m.start()])):  # "not certain", "less certain", "a radiologist should confirm"
                    add("unmeasured", m, True, "a certainty word denied, hedged or asked of a reader", pol=pol)
                    scan = _mask(scan, m.start(), m.end())
                    continue
                if name == "the result taken as final" and re.search(
                        r"\b(?:not|never|cannot|can't|shouldn't|mustn't|nor)\b", scan[:m.start()], re.IGNORECASE):
                    add("unmeasured", m, True, "denied: the result is not to be taken as final", pol=pol)
                    scan = _mask(scan, m.start(), m.end())
                    continue
                if name == "waived review" and not re.search(r"\breview|radiologist|\bread(?:ing|er)?\b", scan,
                                                             re.IGNORECASE):
                    continue  # "not necessary" of something else
                if name == "how the model was trained" and NOT_BEFORE.search(scan[:m.start()]):
                    add("unmeasured", m, True, "denies a 3D network", pol=pol)  # "not a 3D network": true of this one
                    scan = _mask(scan, m.start(), m.end())
                    continue
                if name == "exclusion of disease" and NOT_BEFORE.search(scan[:m.start()]):
                    add("unmeasured", m, True, "says disease is not excluded", pol=pol)  # "does not exclude disease"
                    scan = _mask(scan, m.start(), m.end())
                    continue
                if name == "treatment" and m.group(0).lower().startswith("treat") and \
                        re.match(r"[\w\s,]{0,40}?\b(?:with caution|as)\b", scan[m.end():], re.IGNORECASE):
                    add("unmeasured", m, True, "'treat ... as' or 'with caution' is no treatment", pol=pol)
                    scan = _mask(scan, m.start(), m.end())
                    continue
                what = "negated" if pol.negated else "asserted"
                add("unmeasured", m, False, f"{what} statement about {name}, which the findings do not assess", pol=pol)
                scan = _mask(scan, m.start(), m.end())
        # 1b. the patient's sex, against the record's
        for m in _iter(SEX_WORDS, scan):
            said = "F" if m.group(0).lower() in FEMALE_WORDS else "M"
            sex = f.patient.sex
            add("patient", m, sex == said, "" if sex == said else
                f"gives the patient's sex as {said}; the findings say {sex or 'nothing about it'}")
            scan = _mask(scan, m.start(), m.end())
        # 1c. the clinical presentation, against the history ("presents with seizures" when it says "denies seizures")
        for m in _iter(PRESENTATION, scan):
            what = re.match(r"[\s]*([a-z][a-z\s-]{2,40})", scan[m.end():].lower())
            words = [w for w in re.findall(r"[a-z]{4,}", what.group(1) if what else "") if w not in _CLINICAL_FILLER][:3]
            if not words:
                continue
            ok, reason = self._in_history(words)
            add("patient", m, ok, reason)
            scan = _mask(scan, m.start(), m.end())
        # 2. how far the result can be trusted
        scan = self._trust_claims(add, scan, scope)
        # 2a. the outline and the salient area compared
        scan, compared = self._mask_comparisons(add, sent, scan)
        # 2b. midline crossing
        for m in _iter(CROSSING, scan):
            pol = scope.polarity(m.start(), m.end())
            cm = f.crosses_midline
            if cm is None:
                add("crossing", m, False, "the findings do not say whether the lesion crosses the midline", pol=pol)
            elif pol.negated and cm:
                add("crossing", m, False, "says the lesion does not cross the midline; the findings say it does",
                    conflict=True, pol=pol)
            elif not pol.negated and not cm:
                add("crossing", m, False, "says the lesion crosses the midline; the findings say it does not", pol=pol)
            else:
                add("crossing", m, True, pol=pol)
            scan = _mask(scan, m.start(), m.end())
        for m in _iter(ONE_SIDE_OF_MIDLINE, scan):
            cm = f.crosses_midline
            add("crossing", m, cm is False, "" if cm is False else "says it stays on one side of the midline; the "
                f"findings say it {'crosses' if cm else 'may cross'} it", conflict=bool(cm), pol=Polarity(True, False))
            scan = _mask(scan, m.start(), m.end())
        # 2c. where its centre lies, against the centroid's side; a 2D image or a volume, said of this input
        for m in _iter(CENTRE_SIDE, scan):
            x = (f.centroid or [None])[0]
            said = m.group("side").lower()
            ok = x is not None and ((x < 0) == (said == "left")) and abs(x) > 1.0
            add("side", m, ok, "" if ok else f"puts the centre on the {said}; the centroid's x is "
                f"{'not given' if x is None else f'{x:.0f} mm'} (negative: left)", pol=Polarity(False, False))
            scan = _mask(scan, m.start(), m.end())
        if CENTRE_WORDS.search(scan):
            c = f.centroid
            for m in [*CENTRE_TRIPLE.finditer(scan), *CENTRE_AXIS.finditer(scan)]:
                pairs = ([(a, m.group(a)) for a in "xyz"] if "x" in m.groupdict() and m.groupdict().get("axis") is None
                         else [(m.group("axis").lower(), m.group("v"))])
                said = {a: float(v.replace("\u2212", "-").replace(" ", "")) for a, v in pairs}
                ok = c is not None and all(abs(said[a] - c["xyz".index(a)]) <= CENTRE_TOL_MM for a in said)
                truth = "no centroid" if c is None else "(" + ", ".join(f"{v:.0f}" for v in c) + ") mm"
                add("number", m, ok, "" if ok else f"gives the centre's MNI {'/'.join(said)} as "
                    f"{', '.join(f'{v:+.0f}' for v in said.values())}; the findings give {truth}",
                    pol=Polarity(False, False))
                self._quantity_spans.append((m.start(), m.end()))
        for m in _iter(INPUT_KIND, scan):
            volume_said = bool(m.group("vol"))
            ok = volume_said != f.read_as_slice
            said = "a volume read slice by slice" if volume_said else "a 2D image"
            truth = "a single 2D slice" if f.read_as_slice else "a 3D volume"
            add("input", m, ok, "" if ok else f"calls the input {said}; it is {truth}", pol=Polarity(False, False))
            scan = _mask(scan, m.start(), m.end())
        # 3. classes (before tumour words: "pituitary tumour" is a class)
        class_matches: list[tuple[re.Match, str]] = []
        for cls, pat in CLASS_PATTERNS.items():
            for m in _iter(pat, scan):
                class_matches.append((m, cls))
                scan = _mask(scan, m.start(), m.end())
        class_matches.sort(key=lambda mc: mc[0].start())
        class_spans = [(m.start(), m.end(), cls) for m, cls in class_matches]
        differentials = disjunctions(sent, class_spans)
        for m, cls in class_matches:
            self._class_claim(add, m, cls, scope, sent, differentials.get(m.start(), frozenset()))
        scan_no_pipeline = scan
        for m in _iter(PIPELINE_PHRASES, scan):
            scan_no_pipeline = _mask(scan_no_pipeline, m.start(), m.end())
        scan = scan_no_pipeline
        # 4. regions: specific atlas names, then broad terms, each with an optional side in front
        region_spans: list[tuple[int, int, bool]] = []
        self._mentions: list[tuple[re.Match, str, str | None]] = []
        if region_lexicon():
            for m in _iter(_region_any(), scan):
                base = next(b for b, pat in region_lexicon() if _compiled(pat).fullmatch(m.group(0)))
                self._region_claim(add, m, base, scope, sent, region_spans)
                scan = _mask(scan, m.start(), m.end())
        for key, pat in BROAD.items():
            for m in _iter(pat, scan):
                self._region_claim(add, m, key, scope, sent, region_spans)
                scan = _mask(scan, m.start(), m.end())
        if f.regions:
            self._region_comparison(add, sent, sorted(self._mentions, key=lambda t: t[0].start()))
        # 5. sides not attached to a region
        for m in _iter(SIDE, scan):
            self._side_claim(add, m, scope)
            region_spans.append((m.start(), m.end(), scope.polarity(m.start(), m.end()).negated))
            scan = _mask(scan, m.start(), m.end())
        # 6. tumour presence and "normal study"
        for m in _iter(NORMAL_CLAIM, scan):
            pol = scope.polarity(m.start(), m.end())
            if f.tumour_present and not pol.negated:
                add("tumour", m, False, f"calls the study normal; the findings favour {READABLE_CLASS[f.label]}",
                    conflict=True, pol=pol)
            elif not pol.negated:  # a no-tumour call assessed four classes, not the whole study
                add("tumour", m, False, "calls the study normal; the classifier assessed only its four classes, "
                    "not the whole study", pol=pol)
            else:
                add("tumour", m, True, pol=pol)
            scan = _mask(scan, m.start(), m.end())
        for m in _iter(TUMOUR_WORDS, scan):
            pol = scope.polarity(m.start(), m.end())
            located = any(a > m.end() and neg for a, _b, neg in region_spans)
            if pol.negated and f.tumour_present and not located:
                add("tumour", m, False, f"negates a tumour/mass; the findings favour {READABLE_CLASS[f.label]} "
                    f"(probability {f.top_probability:.2f})", conflict=True, pol=pol)
            elif pol.negated and not f.tumour_present and not ATTRIBUTED.search(sent):
                # "No tumour is present": the absence stated as a fact of the image; the findings hold the classifier's
                # call over four classes only (an outside probe, session 40, round 9)
                add("tumour", m, False, "states the absence of a tumour as a fact; the findings give only the "
                    f"classifier's call (the no-tumour class, probability {f.top_probability:.2f}): say it was not "
                    "detected by the classifier", pol=pol)
            elif not pol.negated and not f.tumour_present:
                p_tumour = 1.0 - f.probabilities[NO_TUMOUR]
                if pol.uncertain and p_tumour >= 0.2:
                    add("tumour", m, True, "hedged", pol=pol)
                else:
                    add("tumour", m, False, f"asserts a tumour/mass; the findings favour the no-tumour class "
                        f"(probability {f.top_probability:.2f})", pol=pol)
            else:
                add("tumour", m, True, pol=pol)
        # 7. numbers, and sizes said in words
        self._extent_claims(add, sent)
        self._hemisphere_share(add, sent)
        self._numbers(add, sent, class_spans, scope, skip=compared + self._quantity_spans)
        for a, b in self._size_words(add, sent, scope):  # checked: their words need no other ground
            scan = _mask(scan, a, b)
        # 7b. another language, and names the identifier patterns do not know
        if FOREIGN_WORDS.search(sent) or len(FOREIGN_WEAK.findall(sent)) >= 2:
            m = FOREIGN_WORDS.search(sent) or FOREIGN_WEAK.search(sent)
            add("language", m, False, "not in English: the verifier reads English only, so nothing it says was checked")
        for m in self._names(sent):
            add("identifier", m, False, "holds what looks like a person's name")
        # 7c. every other word must be one the findings' own report uses or a neutral one (GROUNDED_WORDS)
        unknown = self._ungrounded(scan)
        if unknown:
            m = re.search(re.escape(unknown[0]), sent, re.IGNORECASE) or re.search(r"\S+", sent)
            add("unverified", m, False, f"says what the findings do not give or the verifier cannot check "
                f"({', '.join(unknown[:6])}): say only what the findings state")
        # 8. regions and sides from a saliency mask are the salient area's: said of the lesion or tumour, they put
        # the tumour where the classifier looked (a probe's "The glioma lies in the left white matter" passed for a
        # right-sided glioma whose Grad-CAM area lay left)
        if f.regions_from_saliency and not SALIENT_WORDS.search(sent) and not self._salient_clause:
            for c in claims:
                if c.kind in ("region", "side", "crossing") and c.ok and not c.negated:
                    c.ok = False
                    c.reason = ("the atlas regions and side are those of the saliency map's salient area, where the "
                                "classifier looked, not of the lesion outline: say so")
        return claims

    def _size_words(self, add, sent: str, scope: SentenceScope) -> list[tuple[int, int]]:
        """"A small lesion", "the mass is large": the lesion's largest extent must fit the word. Returns the spans
        of the size words checked."""
        f = self.f
        salient = bool(SALIENT_WORDS.search(sent))
        extents = f.seg_extents_mm if (f.regions_from_saliency and f.seg_extents_mm and not salient) else f.extents_mm
        in_mm = f.kind == "volume" or f.spacing_known
        spans = []
        for m in SIZE_SAID.finditer(sent):
            if re.search(r"\b(?:probability|chance|likelihood|odds)\b[\w\s-]{0,12}$", sent[:m.start()], re.IGNORECASE):
                continue  # "the probability of no tumour is small (0.03)": a probability, checked as a number
            adj = re.search(SIZE_ADJECTIVE, m.group(0), re.IGNORECASE)
            word = adj.group(0).lower()
            spans.append((m.start() + adj.start(), m.start() + adj.end()))
            if not extents or not in_mm:
                add("number", m, False, f"calls the lesion {word}, but the findings give no size in millimetres "
                    "(the pixel spacing is unknown)" if not in_mm else f"calls the lesion {word}; the findings give "
                    "no extent")
                continue
            big = max(extents)
            if adj.group("small"):
                limit = 10.0 if "centim" in word else SMALL_MM
                ok = big < limit
                why = f"calls the lesion {word}; its largest extent is {big:.0f} mm (at least {limit:.0f} mm)"
            else:
                ok = big >= LARGE_MM
                why = f"calls the lesion {word}; its largest extent is {big:.0f} mm (under {LARGE_MM:.0f} mm)"
            add("number", m, ok, "" if ok else why)
        return spans

    _NAME_WORD = r"[A-ZÀ-ÖØ-Þ][a-zß-öø-ÿ]+(?:-[A-ZÀ-ÖØ-Þ][a-zß-öø-ÿ]+)?"
    NAME_AFTER = re.compile(rf"\b(?:for|to|by|in|of|with|from|dear|cc|attn\.?)\s+(?:the attention of\s+)?"
                            rf"(?P<a>{_NAME_WORD})\s+(?P<b>{_NAME_WORD})\b")
    INITIALS = re.compile(r"(?<![\w.])(?P<a>[A-Z])\.\s?(?P<b>[A-Z])\.(?!\w)")  # "(K.M.)", "J. S."
    NAME_ALONE = re.compile(rf"^\s*(?P<a>{_NAME_WORD}|[A-Z]{{3,}}),?\s+(?P<b>{_NAME_WORD}|[A-Z]{{3,}})\.?\s*$")

    def _names(self, sent: str):
        """Two capitalised words that are no word of the product's own ("Report for Jane Doe", "Smith, John.",
        "JOHN SMITH."; an outside probe, session 38): the identifier patterns need a title or "patient" first."""
        known = self._known_words()
        for pat in (self.NAME_AFTER, self.NAME_ALONE, self.INITIALS):
            for m in pat.finditer(sent):
                if m.group("a").lower() not in known and m.group("b").lower() not in known:
                    yield m

    def _ungrounded(self, scan: str) -> list[str]:
        """Words of ``scan`` (a sentence with its checked claims masked) that are neither grounded nor the
        template's, in order, each once."""
        vocab = self._vocabulary()
        out = []
        for w in re.findall(r"[a-z]+(?:'[a-z]+)?", scan.lower()):
            w = w.removesuffix("'s")
            if w in vocab or len(w) <= 1 or w in out:
                continue
            if not any(st in vocab for st in _stems(w) if len(st) >= 3):
                out.append(w)
        return out

    def _vocabulary(self) -> frozenset[str]:
        """GROUNDED_WORDS, the words of the template report of these findings and of its cautions, the regions,
        classes and clinical history the findings give."""
        if getattr(self, "_vocab", None) is None:
            from tumorlens.report.template import assemble, template_draft

            f = self.f
            texts = [*assemble(f, template_draft(f)).text_fields().values(), *f.limitations(), *f.history_limitations(),
                     f.patient.clinical_history or "", *(r["name"] for r in f.regions), *READABLE_CLASS.values(),
                     *CLASS_NAMES]
            words = set(GROUNDED_WORDS) | set(PRODUCT_WORDS)
            for t in texts:
                words |= set(re.findall(r"[a-z]+", t.lower()))
            self._vocab = frozenset(words)
        return self._vocab

    def _known_words(self) -> set[str]:
        if getattr(self, "_known", None) is None:
            words = set(PRODUCT_WORDS)
            for r in self.f.regions:
                words |= set(re.findall(r"[a-z']+", r["name"].lower()))
            for name in READABLE_CLASS.values():
                words |= set(re.findall(r"[a-z']+", name.lower()))
            self._known = words
        return self._known

    def _trust_claims(self, add, scan: str, scope: SentenceScope) -> str:
        """Uncertainty levels, confidence words and familiarity statements against the findings. Caution is
        always allowed ("may not be reliable"); confidence needs low entropy, a familiar image and no
        out-of-scope note. Hedges elsewhere in the sentence do not excuse it ("highly confident that this is
        most likely a meningioma"). Returns ``scan`` with the claims masked."""
        f = self.f
        for m in _iter(UNCERTAINTY_LEVEL, scan):
            pol = scope.polarity(m.start(), m.end())
            # "uncertainty is not low": the "not" is inside the match; "not of low uncertainty" right before it. A denial
            # earlier in the sentence is of something else ("Negative for tumour ..., with low uncertainty")
            near_neg = re.search(r"\b(?:not|no|never|without|nor)\b(?:\W+\w+){0,2}\W*$", scan[:m.start()], re.IGNORECASE)
            if m.group("d") or m.group("e"):  # not low, whichever of moderate and high it is
                said, negated = "low", True
            elif m.group("f"):
                said, negated = "high", False
            else:
                said = LEVEL_OF[(m.group("a") or m.group("b") or m.group("c")).lower()]
                negated = bool(m.group("neg")) or (pol.negated and bool(near_neg))
            ok = (said != f.uncertainty_level) if negated else (said == f.uncertainty_level)
            add("trust", m, ok, "" if ok else f"says uncertainty is {'not ' if negated else ''}{said}; the findings "
                f"give entropy {f.entropy:.2f}, which is {f.uncertainty_level}", pol=pol)
            scan = _mask(scan, m.start(), m.end())
        against = ([f"classifier uncertainty is {f.uncertainty_level}"] if f.uncertainty_level != "low" else []) \
            + (["the image is unlike the training images"] if f.unfamiliar else []) \
            + [r[0].lower() + r[1:] for r in f.out_of_scope()]
        # the placement's level first: "placed with high confidence" is the placement's, not a confidence word
        for m in _iter(PLACEMENT_LEVEL, scan):
            pol = scope.polarity(m.start(), m.end())
            low = (m.group("a") or m.group("b") or m.group("c") or m.group("d")).lower() in ("low", "poor", "limited")
            # only a "not" of its own turns it ("No regions are named because the placement is low-confidence")
            says_low = low != bool(m.group("neg") or m.group("neg2"))
            ok = f.placement_method != "none" and says_low == bool(f.low_confidence_placement)
            add("trust", m, ok, "" if ok else f"calls the atlas placement {'low' if says_low else 'high'}-confidence; "
                f"its confidence is {f.placement_confidence if f.placement_confidence is not None else 'not given'}"
                f" ({'low' if f.low_confidence_placement else 'not low'})", pol=pol)
            scan = _mask(scan, m.start(), m.end())
        for m in _iter(CONFIDENT, scan):
            pol = scope.polarity(m.start(), m.end())
            cautious = pol.negated or bool(CAUTIOUS_BEFORE.search(scan[:m.start()]))
            ok = cautious or not against
            add("trust", m, ok, "" if ok else f"calls the result {m.group(0).lower()}; " + "; ".join(against), pol=pol)
            scan = _mask(scan, m.start(), m.end())
        entropy_sentence = bool(re.search(r"\bentropy\b|\buncertainty\b", scan, re.IGNORECASE))
        found = [*QUANTITY_NUMBER.finditer(scan), *QUANTITY_NUMBER_BEFORE.finditer(scan),
                 *(ENTROPY_MAXIMUM.finditer(scan) if entropy_sentence else ())]
        for m in sorted(found, key=lambda m: m.start("n") if m.group("n") else m.start("n2")):
            q = (m.group("q") or m.groupdict().get("q2") or "").lower()
            num = m.group("n") or m.groupdict().get("n2")
            g = "n" if m.group("n") else "n2"
            if any(m.start(g) < b and a < m.end(g) for a, b in self._quantity_spans):
                continue  # one number, found by two of the patterns
            if re.match(r"\s*(?:against|vs\.?|versus|/)\s*\d", scan[m.end(g):], re.IGNORECASE):
                continue  # a pair ("the threshold: 0.69 against 0.79"): each number is looked up on its own
            if "maximum" in q or q in ("possible", "ceiling") or m.groupdict().get("q2"):
                truth = MAX_ENTROPY
            elif "entropy" in q:
                truth = f.entropy
            elif "layer" in q:
                truth = f.familiarity_numbers[2] if len(f.familiarity_numbers) > 2 else None
            elif "familiarity" in q and "threshold" in q:
                truth = f.familiarity_numbers[1] if len(f.familiarity_numbers) > 1 else None
            elif "familiarity" in q:
                truth = f.familiarity_numbers[0] if f.familiarity_numbers else None
            elif "dice" in q or "similarity" in q or "quality" in q:
                truth = f.placement_quality
            else:
                truth = f.placement_confidence
            ok = truth is not None and abs(float(num) - truth) <= _tol(num)
            add("number", m, ok, "" if ok else f"gives the {q} as {num}; the findings give "
                f"{'none' if truth is None else f'{truth:.2f}'}", pol=Polarity(False, False))
            self._quantity_spans.append((m.start(g), m.end(g)))  # its words stay for the checks below
        for m in ENTROPY_SHARE.finditer(scan) if entropy_sentence and f.entropy is not None else ():
            frac = m.group("frac").lower()
            want = float(re.match(r"[\d.]+", frac).group(0)) / 100.0 if frac[0].isdigit() else SHARE_WORDS[frac]
            ratio, bound = f.entropy / MAX_ENTROPY, (m.group("bound") or "").lower()
            if bound in ("more than", "over", "above", "at least", "just over"):
                ok = ratio > want * 0.97
            elif bound in ("less than", "under", "below", "just under"):
                ok = ratio < want * 1.03
            else:
                ok = abs(ratio - want) <= max(0.05, 0.15 * want)
            add("number", m, ok, "" if ok else f"gives the entropy as {m.group(0).strip()}; it is {f.entropy:.2f} of "
                f"{MAX_ENTROPY:.2f} ({100 * ratio:.0f} %)", pol=Polarity(False, False))
            self._quantity_spans.append((m.start("frac"), m.end("frac")))
        for m in CAUTIONS_DENIED.finditer(scan):
            reason = f.scope_caution()
            add("trust", m, reason is None, "" if reason is None else f"says there is no caution; the findings give one: "
                f"{reason}", pol=Polarity(False, False))
            scan = _mask(scan, m.start(), m.end())
        for m in PLACEMENT_BOUND.finditer(scan):
            conf, n = f.placement_confidence, float(m.group("n"))
            up = m.group("dir").lower() in ("above", "over", "exceeds", "exceed", "exceeding", "greater than", "more than",
                                            "higher than", "at least")
            ok = conf is not None and ((conf >= n if "least" in m.group("dir").lower() else conf > n) if up else conf < n)
            add("number", m, ok, "" if ok else f"puts the placement confidence {m.group('dir').lower()} {n:g}; the findings "
                f"give {'none' if conf is None else f'{conf:.2f}'}", pol=Polarity(False, False))
            self._quantity_spans.append((m.start("n"), m.end("n")))
        for pat, unfamiliar in ((FAMILIAR, False), (UNFAMILIAR, True)):
            for m in _iter(pat, scan):
                pol = scope.polarity(m.start(), m.end())
                says = unfamiliar != pol.negated
                own_hedge = re.search(r"\b(?:may|might|could|possibly|perhaps|potentially)\b(?:\W+\w+){0,2}\W*$",
                                      scan[:m.start()], re.IGNORECASE)
                ok = says == f.unfamiliar or (says and pol.uncertain and bool(own_hedge))  # "may be unlike": caution
                state = "unfamiliar" if f.unfamiliar else "familiar"
                add("trust", m, ok, "" if ok else f"says the image is {'unlike' if says else 'like'} the training "
                    f"images; the familiarity check calls it {state}", pol=pol)
                scan = _mask(scan, m.start(), m.end())
        return scan

    def _class_claim(self, add, m, cls: str, scope: SentenceScope, sent: str,
                     alternatives: frozenset[str] = frozenset()) -> None:
        """``alternatives``: the classes named with this one in a differential ("glioma or meningioma")."""
        f = self.f
        pol = scope.polarity(m.start(), m.end())
        rank = RANK_BEFORE.search(sent[max(0, m.start() - 50):m.start()]) or RANK_AFTER.match(sent[m.end():m.end() + 50])
        if rank and not pol.negated:  # "glioma is the second most likely class", "the least likely is meningioma"
            order = f.ranked
            want = {"second": 1, "next": 1, "third": 2}.get(rank.group("rank").lower(), len(order) - 1)
            ok = abs(f.probabilities[cls] - order[want][1]) < 0.005  # ties count either way
            add("class", m, ok, "" if ok else f"calls {READABLE_CLASS[cls]} the {rank.group('rank').lower()} most likely; "
                f"that is {READABLE_CLASS[order[want][0]]} ({order[want][1]:.2f})", pol=pol)
            return
        if cls == NO_TUMOUR:  # the class's name, as in a list of probabilities
            if f.label == NO_TUMOUR and (re.match(r"\s*(?:class\s+)?(?:is|was)\s+(?:not|no longer)\b", sent[m.end():]) or
                                         re.search(r"\b(?:does|do|did)\s+not\s+(?:favou?r|support|suggest|choose|"
                                                   r"predict|pick)\s+(?:the\s+)?$", sent[:m.start()], re.IGNORECASE)):
                # "the no-tumour class is not favoured" (the "no" before other mentions negates nothing here)
                add("class", m, False, f"negates the no-tumour class, the most likely (probability {f.top_probability:.2f})",
                    conflict=True, pol=pol)
            elif f.label == NO_TUMOUR or pol.uncertain or pol.negated or self._own_probability_near(sent, m.end(), cls):
                add("class", m, True, pol=pol)
            else:
                add("class", m, False, f"names the no-tumour class without its probability; the findings favour "
                    f"{READABLE_CLASS[f.label]}", pol=pol)
            return
        if re.search(r"\b(?:no|none)\b[\w\s-]{0,25}\bother than\s+(?:an?\s+|the\s+)?$", sent[:m.start()], re.IGNORECASE):
            # "no class other than glioma is favoured": glioma is said to be the favoured class
            ok = cls == f.label
            add("class", m, ok, "" if ok else f"says {READABLE_CLASS[cls]} is the favoured class; the findings favour "
                f"{READABLE_CLASS[f.label]} (probability {f.top_probability:.2f})", pol=Polarity(False, False))
            return
        if cls == f.label and f.top_probability >= 0.5 and re.match(
                r"\s*(?:is|was|seems|appears)\s+(?:not|no longer|never)\s+(?:the\s+|a\s+)?(?:[\w-]+\s+){0,3}?"
                r"(?:class|diagnosis|choice|favou?r\w*|answer|prediction|leading|top|first|most)\b", sent[m.end():],
                re.IGNORECASE):  # "meningioma is not the class the classifier favours" (an outside probe, session 39)
            add("class", m, False, f"says {READABLE_CLASS[cls]} is not the favoured class; it is (probability "
                f"{f.top_probability:.2f})", conflict=True, pol=Polarity(True, False))
            return
        if cls == f.label and f.top_probability >= 0.5 and re.match(
                r"[\w\s,]{0,30}?(?<!not )\b(?:unlikely|improbable|doubtful|less likely)\b(?! than)", sent[m.end():], re.IGNORECASE):
            add("class", m, False, f"calls {READABLE_CLASS[cls]} unlikely; it is the most likely class (probability "
                f"{f.top_probability:.2f})", conflict=True, pol=Polarity(True, False))
            return
        if cls != f.label and f.probabilities[cls] < RULED_OUT_MAX and not pol.negated and re.match(
                r"\s*(?:is|seems|appears|remains)\s+(?:very\s+|quite\s+|most\s+|the\s+most\s+)?(?:likely|probable)\b"
                r"(?!\s+(?:than|tumou?r class))", sent[m.end():], re.IGNORECASE):
            add("class", m, False, f"calls {READABLE_CLASS[cls]} likely; its probability is {f.probabilities[cls]:.2f}",
                pol=pol)
            return
        if self._network_choice(sent, cls):  # the limitation naming what the window classifier overruled
            add("class", m, True, "the whole-slice network's first choice", pol=pol)
            return
        near = sent[max(0, m.start() - 40):m.end() + 40]
        offered = cls != f.label and (f.label in alternatives or bool(DIFFERENTIAL_CUE.search(near)))
        if offered and not self._own_probability_near(sent, m.end(), cls) and not self._ranked_first(
                sent, m.start(), m.end()):
            p = f.probabilities[cls]  # a differential, a possibility: only a class the classifier gives some weight
            add("class", m, p >= DIFFERENTIAL_MIN, "" if p >= DIFFERENTIAL_MIN else
                f"offers {READABLE_CLASS[cls]} as a possibility beside {READABLE_CLASS[f.label]}; its probability is "
                f"{p:.2f}", pol=pol)
            return
        if pol.negated:
            if cls == f.label and f.top_probability >= 0.5:
                add("class", m, False, f"negates {READABLE_CLASS[cls]}, the most likely class "
                    f"(probability {f.top_probability:.2f})", conflict=True, pol=pol)
            elif f.probabilities[cls] >= RULED_OUT_MAX:  # "meningioma excluded" at 0.37
                add("class", m, False, f"rules out {READABLE_CLASS[cls]}, which has probability "
                    f"{f.probabilities[cls]:.2f}", conflict=True, pol=pol)
            else:
                add("class", m, True, pol=pol)
        elif cls == f.label and STRONG_LIKELIHOOD.search(near) and f.top_probability < STRONG_MIN:
            add("class", m, False, f"calls {READABLE_CLASS[cls]} {STRONG_LIKELIHOOD.search(near).group(0)}; its "
                f"probability is {f.top_probability:.2f}", pol=pol)
        elif cls != f.label and EQUALLY_LIKELY.search(near) and f.top_probability - f.probabilities[cls] > 0.1:
            add("class", m, False, f"calls {READABLE_CLASS[cls]} as likely as {READABLE_CLASS[f.label]}: "
                f"{f.probabilities[cls]:.2f} against {f.top_probability:.2f}", pol=pol)
        elif cls == f.label:
            add("class", m, True, pol=pol)
        elif f.label in alternatives:  # "meningioma (0.96) or glioma (0.01)": offered as the alternative, listed
            p = f.probabilities[cls]
            add("class", m, p >= DIFFERENTIAL_MIN, "" if p >= DIFFERENTIAL_MIN else
                f"offers {READABLE_CLASS[cls]} as the alternative to {READABLE_CLASS[f.label]}; its probability is "
                f"{p:.2f}", pol=pol)
        elif self._ranked_first(sent, m.start(), m.end()):  # "although a meningioma is more likely": a hedge
            add("class", m, False, f"ranks {READABLE_CLASS[cls]} first; the findings favour {READABLE_CLASS[f.label]} "
                f"(probability {f.top_probability:.2f})", pol=pol)  # word elsewhere does not make this tentative
        elif pol.uncertain or self._own_probability_near(sent, m.end(), cls):
            add("class", m, True, "hedged / listed with its probability", pol=pol)
        else:
            add("class", m, False, f"asserts {READABLE_CLASS[cls]}; the findings favour {READABLE_CLASS[f.label]} "
                f"(probability {f.top_probability:.2f})", pol=pol)

    def _in_history(self, words: list[str]) -> tuple[bool, str]:
        """Whether the clinical history gives ``words`` (a stem of each, in a clause that does not negate it)."""
        history = (self.f.patient.clinical_history or "").lower()
        if not history:
            return False, "states a clinical presentation; the findings hold no clinical history"
        clauses = history_clauses(history)
        for w in words:
            hits = [c for c in clauses if w[:5] in c]
            if not hits:
                return False, f"states '{w}' as clinical history; the history does not give it"
            if all(HISTORY_NEGATED.search(c) for c in hits):
                return False, f"states '{w}' as clinical history; the history negates it"
        return True, ""

    def _network_choice(self, sent: str, cls: str) -> bool:
        """``cls`` named in a sentence about the whole-slice network's first choice, and that is what it was."""
        nc = self.f.network_choice
        return bool(nc and nc[0] == cls and re.search(r"whole-slice network's first choice", sent, re.IGNORECASE))

    @staticmethod
    def _ranked_first(sent: str, start: int, end: int) -> bool:
        """The class is called the likeliest right next to its name ("most likely a meningioma",
        "a meningioma is more likely", "favouring meningioma")."""
        before, after = sent[max(0, start - 30):start].lower(), sent[end:end + 30].lower()
        first = r"(?:most|more) (?:likely|probable|consistent with)|favou?r(?:s|ed|ing)?|(?:best|most) fits?|primary diagnosis"
        return bool(re.search(r"(?:" + first + r")\s+(?:a |an |the )?$", before)
                    or re.match(r"\s*(?:is|are|seems?|appears?)?\s*(?:the )?(?:" + first + r")(?! than)", after)
                    or re.match(r"\s*(?:is|are) (?:more|most) likely(?! than)", after))

    def _own_probability_near(self, sent: str, end: int, cls: str) -> bool:
        tail = sent[end:end + 40]
        m = re.search(r"(\d+(?:\.\d+)?)\s*(%)?", tail)
        if not m:
            return False
        v = float(m.group(1)) / (100.0 if m.group(2) or float(m.group(1)) > 1 else 1.0)
        return abs(v - self.f.probabilities[cls]) <= _tol(m.group(1), scale=100.0 if (m.group(2) or float(m.group(1)) > 1) else 1.0)

    def _region_claim(self, add, m, key: str, scope: SentenceScope, sent: str, region_spans: list) -> None:
        f = self.f
        pol = scope.polarity(m.start(), m.end())
        before = sent[max(0, m.start() - 24):m.start()].lower()
        side_m = re.search(r"\b(left|right)(?:[- ]sided)?\s+(?:\w+\s+){0,2}$", before)
        side = side_m.group(1) if side_m else None
        region_spans.append((m.start(), m.end(), pol.negated))
        self._mentions.append((m, key, side))
        name = f"{side + ' ' if side else ''}{m.group(0)}"
        if not f.regions and key != "sellar":
            why = "the placement is low-confidence" if f.low_confidence_placement else "the findings name no regions"
            if pol.negated:
                add("region", m, True, f"negated; {why}", pol=pol)
            else:
                add("region", m, False, f"names {name}, but {why}", pol=pol)
            return
        supported = (side, key) in self.pairs if side else key in self.keys
        if supported and not pol.negated and f.regions:
            supported = self._share_said_holds(sent, m, key, side, region_spans)
            if not supported:
                add("region", m, False, f"says most of it, or its largest share, lies in {name}; findings shares: "
                    + ", ".join(f"{r['hemisphere']} {r['name']} {r['fraction']:.0%}" for r in f.regions[:4]), pol=pol)
                return
        share = REGION_SHARE_AFTER.match(sent[m.end():]) or REGION_SHARE_BEFORE.search(sent[:m.start()])
        if share and not pol.negated and f.regions:  # "the left thalamus accounts for 12 %": that region's share
            said = float(share.group("pct"))
            held = 100 * self._share(key, side)
            if abs(said - held) > max(1.0, 0.1 * held):
                add("region", m, False, f"gives {name} {said:g} %; the findings give it {held:.1f} %", pol=pol)
                return
        if key == "sellar" and f.regions_from_saliency and SALIENT_WORDS.search(sent) and \
                not any("sellar" in ks for ks in self.region_keys):
            supported = False  # the class puts a pituitary tumour at the sella, not the saliency map's salient area
        if pol.negated:
            if supported and key != "supratentorial":
                add("region", m, False, f"says {name} is not involved; the findings list it", conflict=True, pol=pol)
            else:
                add("region", m, True, pol=pol)
        elif supported:
            add("region", m, True, pol=pol)
        else:
            listed = ", ".join(f"{r['hemisphere']} {r['name']}" for r in f.regions) or "none"
            add("region", m, False, f"names {name}; findings regions: {listed}", pol=pol)

    def _region_comparison(self, add, sent: str, mentions: list[tuple[re.Match, str, str | None]]) -> None:
        """Two regions of the findings compared by share, the first named against the second."""
        if len(mentions) != 2:
            return
        (m1, k1, s1), (m2, k2, s2) = mentions
        cue = REGION_MORE.search(sent[m1.end():m2.start()])
        if not cue:
            return
        a, b = self._share(k1, s1), self._share(k2, s2)
        more = cue.group("dir").lower() in ("larger", "greater", "bigger", "more")
        ok = a > b if more else a < b
        add("region", cue, ok, "" if ok else f"says {m1.group(0)} holds {'more' if more else 'less'} than "
            f"{m2.group(0)}; the findings give {100 * a:.1f} % and {100 * b:.1f} %", pol=Polarity(False, False))

    def _share_said_holds(self, sent: str, m: re.Match, key: str, side: str | None, region_spans: list) -> bool:
        """"Most of the salient area lies in the occipital lobe", "predominantly in the left postcentral gyrus",
        "the right putamen holds the largest share": the region (or lobe) must hold over half of it, or be the one
        holding the largest share (an outside probe, session 38: 7 % was "most of it")."""
        f = self.f
        before = sent[:m.start()]
        cue = MAIN_REGION.search(before)
        if cue and any(cue.end() <= a < m.start() for a, _b, _neg in region_spans[:-1]):
            cue = None  # the cue belongs to a region named before this one
        largest_after = LARGEST_AFTER.match(sent[m.end():])
        ordinal = REGION_RANK_AFTER.match(sent[m.end():])
        if ordinal:  # the n-th largest: as many distinct larger shares as the rank says; "among the top n": fewer
            held = self._share(key, side)
            above = {r["fraction"] for r in f.regions if r["fraction"] > held + 1e-9}
            if ordinal.group("top"):
                top = ordinal.group("top").lower()
                return len(above) < (int(top) if top.isdigit() else ("two", "three", "four", "five").index(top) + 2)
            n = ("second", "third", "fourth", "fifth").index((ordinal.group("ord") or ordinal.group("ord2")).lower()) + 1
            return len(above) == n
        if not cue and not largest_after:
            return True

        if largest_after or "larg" in cue.group(0).lower():
            return self._share(key, side) >= max(r["fraction"] for r in f.regions)
        return self._share(key, side) > 0.5

    def _share(self, key: str, side: str | None) -> float:
        """The fraction of the lesion in the regions answering to ``key`` (on ``side``, when one is said)."""
        return sum(r["fraction"] for r, ks in zip(self.f.regions, self.region_keys, strict=True)
                   if key in ks and (side is None or r["hemisphere"] == side))

    def _side_claim(self, add, m, scope: SentenceScope) -> None:
        f = self.f
        pol = scope.polarity(m.start(), m.end())
        word = m.group(0).lower()
        side = "bilateral" if word.startswith(("bilateral", "both")) else word.split("-")[0].split(" ")[0]
        allowed = f.allowed_sides
        if pol.negated:
            share = {h: sum(r["fraction"] for r in f.regions if r["hemisphere"] == h) for h in ("left", "right")}
            if side in ("left", "right") and re.search(ONLY_SIDE, scope.sentence[:m.start()], re.IGNORECASE):
                ok = f.laterality != side  # "not limited to the left hemisphere": more than the left
                add("side", m, ok, "" if ok else f"says not only {side}; the findings say {f.laterality}", pol=pol)
            elif side in ("left", "right") and f.laterality in ("bilateral", "midline") and share[side] >= 0.2:
                # "does not involve the right hemisphere" for an area 31 % right (an outside probe, session 39)
                add("side", m, False, f"negates the {side} side; {share[side]:.0%} of it lies there", conflict=True,
                    pol=pol)
            elif side == f.laterality or (side == "bilateral" and f.crosses_midline):
                add("side", m, False, f"negates the {side} side; the findings say {f.laterality}", conflict=True, pol=pol)
            else:
                add("side", m, True, pol=pol)
        elif side in ("left", "right") and (re.search(ONLY_SIDE, scope.sentence[:m.start()], re.IGNORECASE)
                                            or re.match(ONLY_SIDE_AFTER, scope.sentence[m.end():], re.IGNORECASE)):
            ok = side == f.laterality  # "confined to the left": one side and nothing on the other
            add("side", m, ok, "" if ok else f"says only {side}; the findings say laterality {f.laterality}", pol=pol)
        elif side in ("left", "right") and (
                re.search(MAIN_SIDE, scope.sentence[:m.start()], re.IGNORECASE)
                or re.match(MAIN_SIDE_AFTER, scope.sentence[m.end():], re.IGNORECASE)
                or (re.search(MAIN_SHARE, scope.sentence[:m.start()], re.IGNORECASE)
                    and re.match(r"(?:[- ]sided|[- ]hemispher\w*|\s+(?:hemispheres?|side)\b)", word[len(side):]
                                 + scope.sentence[m.end():m.end() + 12].lower()))):
            share = {h: sum(r["fraction"] for r in f.regions if r["hemisphere"] == h) for h in ("left", "right")}
            if any(share.values()):
                main = max(share, key=share.get)
                ok = side == main
                reason = f"says mainly {side}; most of the lesion is on the {main} ({share[main]:.0%} against {share[side]:.0%})"
            else:  # no region shares to weigh (e.g. a 2D slice with no regions named): the laterality decides
                ok = side == f.laterality or (f.laterality in ("unknown", "bilateral", "midline") and side in allowed)
                reason = f"says mainly {side}; the findings say laterality {f.laterality}"
            add("side", m, ok, "" if ok else reason, pol=pol)
        elif side in ("left", "right") and f.laterality == "bilateral" and re.match(
                r"[\s-]*(?:cerebral\s+)?(?:hemisphere|side)\b", word[len(side):] + scope.sentence[m.end():m.end() + 20],
                re.IGNORECASE) and re.search(r"\b(?:lies|lie|is|are|located|sits|situated)\s+(?:with)?in\s+the\s*$",
                                             scope.sentence[:m.start()], re.IGNORECASE) and not re.search(
                r"\b(?:both|partly|partially|also|extends?|and the (?:left|right)|as well|spans?|most|majority|largest|"
                r"share|third|thirds|half|quarters?|part|portion|fraction|less|more|some|regions?|bulk)\b|%",
                scope.sentence, re.IGNORECASE):
            add("side", m, False, f"says it lies in the {side} hemisphere; it lies in both", pol=pol)
        elif side in allowed:
            add("side", m, True, pol=pol)
        else:
            add("side", m, False, f"states {side}; the findings say laterality {f.laterality}"
                + (f" (region sides: {', '.join(sorted(allowed))})" if allowed else ""), pol=pol)

    def _extent_claims(self, add, sent: str) -> None:
        """A length said as a mask's longest extent, or along one of its axes, must be that extent (a sentence about
        one mask: the outline, or the salient area)."""
        f = self.f
        salient, outline = bool(SALIENT_WORDS.search(sent)), bool(OUTLINE_NOUN.search(sent))
        if salient == outline:
            return  # both masks, or none named: the plain size check weighs it
        ext = list(f.extents_mm) if salient or not f.regions_from_saliency else list(f.seg_extents_mm)
        longest, axis = EXTENT_LONGEST.search(sent), EXTENT_AXIS.search(sent)
        if not ext or not (longest or axis) or re.search(r"\b(?:exceeds?|more than|over|under|less than|at most|up to|"
                                                         r"no (?:dimension|axis))\b", sent, re.IGNORECASE):
            return
        if axis:
            k = ("first", "second", "third").index(axis.group("o").lower()) if axis.group("o") else \
                ("one", "two", "three", "1", "2", "3").index(axis.group("n").lower()) % 3
            if k >= len(ext):
                return
            want, what = ext[k], f"its {('first', 'second', 'third')[k]} axis"
        else:
            want, what = max(ext), "its longest extent"
        for m in EXTENT_NUMBER.finditer(sent):
            mm = float(m.group("n")) * (10.0 if m.group("u").lower() == "cm" else 1.0)
            ok = abs(mm - want) <= max(1.5, 0.02 * want)
            add("number", m, ok, "" if ok else f"gives {what} as {m.group(0)}; the findings give {want:.0f} mm "
                f"({' x '.join(f'{e:.0f}' for e in ext)} mm)", pol=Polarity(False, False))
            self._quantity_spans.append((m.start(), m.end()))

    def _hemisphere_share(self, add, sent: str) -> None:
        """A share of the salient area given to one hemisphere must be that hemisphere's (the regions' fractions on
        that side); said of no region, in a sentence about the salient area and one side."""
        f = self.f
        if not f.regions_from_saliency or not SALIENT_WORDS.search(sent) or not f.regions:
            return
        sides = set(re.findall(r"\b(left|right)\b", sent, re.IGNORECASE))
        if len(sides) != 1 or any(k in sent.lower() for k in self.keys if len(k) > 5 and k not in ("left", "right")):
            return
        side = sides.pop().lower()
        held = sum(r["fraction"] for r in f.regions if r["hemisphere"] == side)
        for m in HEMI_SHARE.finditer(sent):
            said = float(m.group("pct")) / 100.0 if m.group("pct") else HEMI_WORDS[m.group("word").lower()]
            ok = abs(said - held) <= max(0.05, 0.12 * held)
            add("number", m, ok, "" if ok else f"gives the {side} hemisphere {m.group(0).strip()} of the salient area; "
                f"the regions on that side hold {100 * held:.0f}%", pol=Polarity(False, False))
            self._quantity_spans.append((m.start(), m.end()))

    def _mask_comparisons(self, add, sent: str, scan: str) -> tuple[str, list[tuple[int, int]]]:
        """A sentence naming both the outline and the salient area and comparing them: larger or smaller, the
        same size, N times, a fraction of, wider or narrower, overlapping or not. Checked against the two masks'
        counts, extents and the outline's share inside the salient area; the comparison's words and numbers
        are masked (they are the masks' ratio, no value of the findings). Returns (scan, spans checked)."""
        f = self.f
        o, sa = OUTLINE_NOUN.search(sent), SALIENT_NOUN.search(sent)
        if not o or not sa:
            return scan, []
        spans = []
        outline_first = o.start() < sa.start()
        sizes = (f.seg_voxels, f.mask_voxels) if f.regions_from_saliency else (None, None)
        ratio = None  # the first-named mask's size over the other's
        if sizes[0] and sizes[1]:
            ratio = sizes[0] / sizes[1] if outline_first else sizes[1] / sizes[0]
        ext = (max(f.seg_extents_mm, default=0.0), max(f.extents_mm, default=0.0)) if f.regions_from_saliency else (0, 0)
        ext_ratio = (ext[0] / ext[1] if outline_first else ext[1] / ext[0]) if ext[0] and ext[1] else None
        less_said = bool(re.search(r"\b(?:smaller|less|lesser)\b", sent, re.IGNORECASE))
        for m in MASK_COMPARISON.finditer(scan):
            kind = next(k for k in ("of_two", "overlap_none", "within", "same", "times", "fraction", "extent_more", "extent_less",
                                    "more", "less") if m.group(k))
            inside = f.outline_inside
            if kind == "of_two":  # of the mask named nearest before it
                before = sent[:m.start()]
                last_o = max((x.end() for x in OUTLINE_NOUN.finditer(before)), default=-1)
                last_s = max((x.end() for x in SALIENT_NOUN.finditer(before)), default=-1)
                subject_outline = last_o > last_s
                larger = bool(re.search(r"larger|bigger|greater", m.group(0), re.IGNORECASE))
                ok = bool(sizes[0] and sizes[1]) and ((sizes[0] > sizes[1]) == subject_outline) == larger
                truth = f"outline {sizes[0]}, salient area {sizes[1]}"
            elif kind == "overlap_none":
                ok = inside is not None and inside < 0.01
                truth = "unknown" if inside is None else f"{100 * inside:.0f}% of the outline lies in the salient area"
            elif kind == "within":
                if not re.search(SALIENT_NOUN, sent[m.end():]):
                    continue  # "lies within the left hemisphere": no comparison of the masks
                whole = bool(re.search(r"entirely|wholly|completely|fully", m.group(0), re.IGNORECASE))
                ok = inside is not None and inside >= (0.95 if whole else 0.5)
                truth = "unknown" if inside is None else f"{100 * inside:.0f}% of the outline lies in the salient area"
            elif kind in ("extent_more", "extent_less"):
                ok = ext_ratio is not None and (ext_ratio > 1.0 if kind == "extent_more" else ext_ratio < 1.0)
                truth = "no extents to compare" if ext_ratio is None else \
                    f"largest extents: outline {ext[0]:.0f} mm, salient area {ext[1]:.0f} mm"
            else:
                if ratio is None:
                    ok, truth = False, "the findings give no two masks to compare"
                else:
                    if kind == "same":
                        ok = 0.8 <= ratio <= 1.25
                    elif kind in ("times", "fraction"):
                        bound = (m.group("bound_t") or m.group("bound_f") or "").lower()
                        said = m.group(0).lower()
                        if kind == "times":
                            n = float(m.group("n")) + (0.5 if m.group("and_half") else 0.0) if m.group("n") else \
                                (2.0 if "twice" in said else 3.0)
                            want = 1.0 / n if less_said and not bound else n
                            tol = 0.25
                        else:
                            want = FRACTION_WORDS[re.sub(r"\s+", " ", re.search(_FRACTION, said).group(0))]
                            tol = 0.3
                        if bound in ("less than", "fewer than", "under", "below", "at most", "up to"):
                            ok = ratio < want * (1 + tol)
                        elif bound:
                            ok = ratio > want * (1 - tol)
                        else:
                            ok = abs(ratio - want) <= tol * want
                    else:
                        ok = ratio > 1.0 if kind == "more" else ratio < 1.0
                    truth = (f"outline {sizes[0]}, salient area {sizes[1]} "
                             f"{'voxels' if f.kind == 'volume' else 'pixels'}")
            if kind in ("same", "more", "less", "extent_more", "extent_less") and re.search(
                    r"\b(?:not|no|never)\s+(?:\w+\s+)?$", scan[:m.start()], re.IGNORECASE):
                # "is not larger than": the denial holds where the comparison fails, if there is anything to compare
                known = ext_ratio is not None if kind.startswith("extent") else ratio is not None
                ok = not ok if known else ok
            add("comparison", m, ok, "" if ok else f"compares the outline and the salient area ('{m.group(0)}'); "
                + truth, pol=Polarity(False, False))
            spans.append((m.start(), m.end()))
            scan = _mask(scan, m.start(), m.end())
        return scan, spans

    def _numbers(self, add, sent: str, class_spans, scope: SentenceScope,
                 skip: list[tuple[int, int]] = ()) -> None:
        f = self.f
        differentials = disjunctions(sent, class_spans)
        pat = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(\s*(?:%|percent\b|mm2|mm²|mm\^2|mm3|mm³|cm3|cm³|cm2|cm²|ml\b|mm\b|cm\b|"
                         r"years?\b|-year|px\b|pixels?\b|voxels?\b))?")
        if re.fullmatch(r"\s*\d+[.)]\s*", sent):
            return  # a list marker split off as its own "sentence"
        # "glioma is favoured over meningioma (0.55 vs 0.37)": the probabilities in one bracket belong to the class
        # names before it, in order (each number had been tied to the nearest name, and the pair always failed)
        paired: dict[int, str] = {}
        for g in re.finditer(r"\(([^()]*)\)", sent):
            nums = [n for n in re.finditer(r"(?<![\w.])\d+(?:\.\d+)?", g.group(1))]
            joined = re.fullmatch(r"\s*(?:p\s*=?\s*)?\d+(?:\.\d+)?%?(?:\s*(?:vs\.?|versus|and|against|to|,|/)\s*"
                                  r"(?:p\s*=?\s*)?\d+(?:\.\d+)?%?)+\s*", g.group(1))
            before = [cls for _a, b, cls in class_spans if b <= g.start()]
            if joined and 2 <= len(nums) <= len(before):
                for n, cls in zip(nums, before[-len(nums):], strict=True):
                    paired[g.start(1) + n.start()] = cls
        for m in pat.finditer(sent):
            if any(a <= m.start() < b for a, b in skip):
                continue  # a ratio of the two masks, checked as a comparison
            num, unit = m.group(1), (m.group(2) or "").strip().lower()
            nxt = sent[m.end():m.end() + 1]
            if not unit and nxt.isalpha():  # 2D, 3rd, T1 ...
                continue
            if re.match(r"^\s*\d+[.)]\s", sent[: m.end() + 2]) and m.start() == len(sent) - len(sent.lstrip()):
                continue  # a list marker
            x = float(num)
            pct = unit in ("%", "percent")
            # a probability right after a class name must be that class's probability
            owner, gap, near = paired.get(m.start()), 26, None
            for a, b, cls in class_spans if owner is None else ():
                if 0 <= m.start() - b < gap and (pct or x <= 1.0):
                    owner, gap, near = cls, m.start() - b, a
            if owner is not None:
                v = f.probabilities[owner] * (100.0 if pct else 1.0)
                if self._network_choice(sent, owner):
                    v = f.network_choice[1] * (100.0 if pct else 1.0)
                ok = abs(x - v) <= _tol(num)
                # one probability after a differential ("pituitary tumour or meningioma (probability 0.55)") may be
                # any of its members'
                members = differentials.get(near, frozenset()) if near is not None else frozenset()
                if not ok and members:
                    ok = any(abs(x - f.probabilities[c] * (100.0 if pct else 1.0)) <= _tol(num) for c in members)
                reason = "" if ok else f"gives {READABLE_CLASS[owner]} probability {m.group(0).strip()}; the findings say {f.probabilities[owner]:.2f}"
                add("number", m, ok, reason)
                continue
            # a sentence naming both masks may give either's size ("the outline 80.9 cm3, the salient area 198.2 cm3")
            both = bool(SALIENT_WORDS.search(sent) and (OUTLINE_NOUN.search(sent) or re.search(
                r"segmentation head|\boutlin(?:es?|ed|ing)\b|\bsegment(?:s|ed)?\b", sent, re.IGNORECASE)))
            pool = numbers_for_unit(f, unit, bool(SIZE_WORDS.search(sent[max(0, m.start() - 40):m.start()])),
                                    salient=None if both else bool(SALIENT_WORDS.search(sent)))
            if pool is None:  # the familiarity score and threshold, in a sentence about familiarity only
                pool = f.numbers + (f.familiarity_numbers if re.search(r"familiar|threshold", sent, re.IGNORECASE)
                                    else [])
            ok = any(abs(x - v) <= max(_tol(num), 0.01 * abs(v) if abs(v) >= 100 else 0.0) for v in pool)
            add("number", m, ok, "" if ok else f"the number {m.group(0).strip()} is not in the findings"
                + (f" as a {unit} value" if unit else ""))

    # ---- whole report -------------------------------------------------------------------------
    def check(self, report: RadiologyReport) -> dict[str, Any]:
        claims: list[Claim] = []
        # the cautions the history calls for name what the classifier cannot assess (metastasis, treatment): they
        # are the facts' own sentences, checked for identifiers only
        cautions = set(self.f.history_limitations())
        own = self._own_text()
        for field, text in report.text_fields().items():
            odd = odd_characters(text or "")
            if odd:
                claims.append(Claim(field, "text", ", ".join(odd[:4]), (text or "").strip()[:200], False, False, False,
                                    False, "holds letters outside plain English text or invisible characters "
                                    f"({', '.join(odd[:4])}): a lookalike letter hides a word from every check"))
            norm = normalise(text or "")
            prev = ""
            for _start, sent in split_sentences(norm):
                # a clause after a semicolon about the salient area ("...; its largest share is in the left
                # precentral gyrus") is the salient area's too (refused for three outside rounds running)
                self._salient_clause = bool(prev.rstrip().endswith(";") and SALIENT_WORDS.search(prev)
                                            and re.search(r"\b(?:its?|of it)\b", sent, re.IGNORECASE))
                prev = sent
                if field.startswith("limitations") and text.strip() in cautions:
                    continue
                if self._quotes_own_note(sent, own):
                    continue  # the findings' own note or caution, quoted: true of this record by construction
                claims.extend(self._sentence(field, sent))
            # the whole field at once: "Dictated for Dr. Meier." is split after "Dr."
            claims.extend(_identifiers(field, norm))
        for i, text in enumerate(report.matched_descriptions):  # quoted from the record, not verified as claims
            claims.extend(_identifiers(f"matched_descriptions[{i}]", text))
        claims.extend(self._structured(report))
        return summarise(claims)

    _salient_clause = False

    def _own_text(self) -> str:
        """The findings' own notes, limitations and cautions, lower case with single spaces."""
        f = self.f
        return " | ".join(re.sub(r"\s+", " ", t.lower()) for t in (*f.notes, *f.limitations(), *f.out_of_scope()))

    @staticmethod
    def _quotes_own_note(sent: str, own: str) -> bool:
        """A sentence of at least 30 characters that is a word-bounded part of the record's own notes (the product's
        notes quoted in a draft were refused: "on skull-stripped volumes the network does not separate tumour
        from healthy brains" read as denying the tumour; session 39 probe)."""
        core = re.sub(r"\s+", " ", sent.strip().lower()).strip(" .;:")
        core = re.sub(r"^(?:the |a |an )", "", core)
        if len(core) < 30:
            return False
        return bool(re.search(r"(?<![\w])" + re.escape(core) + r"(?![\w])", own))

    def _structured(self, report: RadiologyReport) -> list[Claim]:
        f = self.f
        out = []
        names = {r["name"].lower() for r in f.regions} | {r["label"].lower() for r in f.regions}
        for r in report.regions:
            bare = re.sub(r"^(left|right)\s+", "", r.lower())
            ok = r.lower() in names or bare in names
            out.append(Claim("regions", "structured", r, r, False, False, ok, False, "" if ok else "region not in the findings"))
        lat_ok = report.laterality == f.laterality
        out.append(Claim("laterality", "structured", report.laterality, report.laterality, False, False, lat_ok, False,
                         "" if lat_ok else f"findings laterality is {f.laterality}"))
        for d in report.differential:
            ok = d.diagnosis in CLASS_NAMES and abs(d.probability - f.probabilities[d.diagnosis]) <= 0.005
            out.append(Claim("differential", "structured", f"{d.diagnosis} {d.probability:.2f}", "", False, False, ok, False,
                             "" if ok else "class or probability differs from the findings"))
        return out


def disjunctions(sent: str, class_spans: list[tuple[int, int, str]]) -> dict[int, frozenset[str]]:
    """For each class name (by its start) joined to others by "or" ("glioma or meningioma", "glioma, meningioma or
    pituitary tumour", "glioma/meningioma"), the other classes of that differential. A chain joined by commas alone
    is a list, not a differential."""
    out: dict[int, frozenset[str]] = {}
    chain: list[tuple[int, int, str]] = []
    has_or = False

    def close() -> None:
        if len(chain) > 1 and has_or:
            for a, _b, cls in chain:
                out[a] = frozenset(c for _a, _b2, c in chain if c != cls)

    for span in sorted(class_spans):
        link = DISJUNCTION_LINK.fullmatch(sent[chain[-1][1]:span[0]]) if chain else None
        if link:
            chain.append(span)
            has_or = has_or or bool(re.search(r"\bor\b|/", link.group(0), re.IGNORECASE))
        else:
            close()
            chain, has_or = [span], False
    close()
    return out


def _identifiers(field: str, text: str) -> list[Claim]:
    """A name, date, e-mail or record number in a report's text (a model can write "for Mrs Jane Doe" from
    nothing, and matched descriptions come from the record): never supported."""
    from tumorlens.findings.identifiers import PERSONAL, find_identifiers

    kinds = [k for k in find_identifiers(text) if k in (*PERSONAL, "address")]
    return [Claim(field, "identifier", ", ".join(kinds), text.strip(), False, False, False, False,
                  f"holds what looks like a patient identifier ({', '.join(kinds)})")] if kinds else []


def _tol(num: str, scale: float = 1.0) -> float:
    d = len(num.split(".")[1]) if "." in num else 0
    return (0.5 * 10 ** (-d) + 1e-6) / scale


def summarise(claims: list[Claim]) -> dict[str, Any]:
    """The verification record: what was checked and what failed."""
    unsupported = [asdict(c) for c in claims if not c.ok and not c.conflict]
    conflicts = [asdict(c) for c in claims if c.conflict]
    kinds: dict[str, int] = {}
    for c in claims:
        kinds[c.kind] = kinds.get(c.kind, 0) + 1
    return {
        "supported": not unsupported and not conflicts,
        "unsupported_claims": unsupported,
        "negation_conflicts": conflicts,
        "checked": {"claims": len(claims), "by_kind": kinds, "negated": sum(c.negated for c in claims),
                    "items": [asdict(c) for c in claims]},
    }


def verify_report(report: RadiologyReport, facts: Facts) -> dict[str, Any]:
    """Verification dict (``supported``, ``unsupported_claims``, ``negation_conflicts``, ``checked``)."""
    return Verifier(facts).check(report)


def problems_text(verification: dict[str, Any], limit: int = 8) -> str:
    """The failures as short lines, to feed back to the model in the repair round."""
    lines = []
    for c in (verification["negation_conflicts"] + verification["unsupported_claims"])[:limit]:
        lines.append(f'- "{c["text"]}" in "{c["sentence"][:120]}": {c["reason"]}')
    return "\n".join(lines)

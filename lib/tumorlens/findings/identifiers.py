"""Identifier-like text in free clinical history: one list of patterns for the findings record (which
refuses such text) and the report's prompt (which redacts it if it ever gets there).

Clinical history is typed by people or copied from headers, so identifiers come in free form:
"MRN 00123456", "DOB 1 January 1970", "Patient John Smith", "hospital number 4471093". The patterns
favour false alarms over leaks: a refused record can be edited; a leaked name cannot be taken back.
They cannot find every bare name (that needs a name list or a tagger); what they catch is the usual
shapes: a keyword before a value, a title or "patient"/"referred by" before capitalised words, a
capitalised name followed by its birth date, any date finer than a year, any long number.
"""

from __future__ import annotations

import re
from pathlib import Path

_MONTH = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|jun(?:e)?|jul(?:y)?|aug(?:ust)?|"
          r"sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)")
_NAME = r"[A-Z][a-z]+(?:[-'][A-Z]?[a-z]+)?"

PATTERNS: list[tuple[re.Pattern, str]] = [
    (re.compile(r"\b[\w.+-]+@[\w-]+\.[\w.]+\b"), "email"),
    (re.compile(r"(?<![\dA-Za-z.])(?:\d{4}-\d{2}-\d{2}|\d{1,2}[./-]\d{1,2}[./-]\d{2,4})(?![\dA-Za-z]|\.\d)"),
     "date"),  # not inside a dotted DICOM UID
    # a date written with spaces or underscores between its parts (1970 01 01, 1970_01_01)
    (re.compile(r"(?<![\dA-Za-z])(?:19|20)\d{2}[ _](?:0[1-9]|1[0-2])[ _](?:0[1-9]|[12]\d|3[01])(?![\dA-Za-z])"), "date"),
    # a compact date (19700101) standing alone: not part of a longer number or of a hex digest
    (re.compile(r"(?<![\dA-Za-z])(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])(?![\dA-Za-z])"), "date"),
    (re.compile(r"\b\d{1,2}(?:st|nd|rd|th)?\s+(?:of\s+)?" + _MONTH + r"\.?,?\s+\d{2,4}\b|\b" + _MONTH
                + r"\.?\s+\d{1,2}(?:st|nd|rd|th)?,?\s+\d{4}\b|\b" + _MONTH + r"\.?\s+\d{4}\b", re.IGNORECASE), "date"),
    # names: after a title, "patient", "referred by", "seen by"; or capitalised words before a birth date
    (re.compile(r"\b(?:(?i:mr|mrs|ms|miss|mx|dr|prof)\.?|(?i:patient|referred\s+by|seen\s+by|named|called))[:\s]\s*"
                + _NAME + r"(?:\s+" + _NAME + r")?"), "name"),
    (re.compile(_NAME + r"\s+" + _NAME + r"(?=,?\s+(?i:born|b\.|dob|aged?)\b)"), "name"),
    # DICOM's person-name form, family^given ("SMITH^JOHN", copied from a PatientName tag)
    (re.compile(r"[^\W\d_]{2,}\^[^\W\d_]{2,}"), "name"),
    # a keyword naming an identifier, then its value (with or without ':' '=' '#' 'no.' 'number'): a token
    # holding a digit, or a capitalised name
    (re.compile(r"\b(?i:mrn|d\.?o\.?b\.?|date\s+of\s+birth|born(?:\s+on)?|patient\s*(?:id|name|number|no\.?)|"
                r"(?:hospital|nhs|medical\s+record|record|case|chart|insurance|social\s+security)\s*(?:number|no\.?|id|#)|"
                r"ssn|accession(?:\s+number)?|name|id)\b\s*(?i:[:=#]|no\.?|number)?\s*[:=#]?\s*"
                r"(?:[\w./-]*\d[\w./-]*|" + _NAME + r"(?:\s+" + _NAME + r")?)"), "identifier"),
    # addresses: a house number before a street word, "lives at / address", UK and Canadian postcodes
    (re.compile(r"\b\d+[A-Za-z]?\s+(?:[A-Z][\w'-]*\s+){1,3}(?i:street|st|road|rd|avenue|ave|lane|ln|drive|dr|"
                r"boulevard|blvd|way|close|court|ct|place|pl|terrace|crescent|square|sq|gardens)\b|"
                r"\b(?i:lives\s+at|living\s+at|resides\s+at|address)\b|"
                r"\b[A-Z]{1,2}\d[A-Z\d]?\s*\d[A-Z]{2}\b|\b[A-Z]\d[A-Z]\s?\d[A-Z]\d\b"), "address"),
    # long numbers and letter-number codes (record numbers, phone numbers)
    (re.compile(r"\+?\d[\d\s().-]{7,}\d|\b[A-Za-z]{0,3}-?\d{6,}[A-Za-z0-9]*\b|\b[A-Za-z]{1,3}\d{5,}\b"), "number"),
]


# a capitalised word inside a sentence of free clinical text is a name unless a disease or sign follows it
# (an eponym: "Cushing syndrome", "Parkinson's disease") or it is a month or a day
_EPONYM_NEXT = re.compile(r"(?:'s|’s)?\s+(?i:disease|syndrome|sign|lymphoma|tumou?r|criteria|scale|score|"
                          r"classification|grade|palsy|phenomenon|reflex|test|type|neuralgia|aneurysm|cyst|pouch)\b")
_CALENDAR = {"January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
             "November", "December", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday",
             "I", "English"}


def capitalised_names(text: str) -> list[str]:
    """Capitalised words inside a sentence ("Anna Meier reports headaches" gives Meier): in a clinical history a
    plain name needs no title to be one (session 39 audit), while the history's own words are lower case."""
    out = []
    for sentence in re.split(r"(?<=[.!?:;])\s+|\n+", text):
        for m in re.finditer(r"(?<=\s)" + _NAME + r"\b", sentence):
            if m.group(0) not in _CALENDAR and not _EPONYM_NEXT.match(sentence[m.end():]):
                out.append(m.group(0))
    return out


def find_identifiers(text: str) -> list[str]:
    """Kinds of identifier-like text found (empty when none)."""
    return list(dict.fromkeys(kind for pat, kind in PATTERNS if pat.search(text)))


# what can hold a person's identity in an id or a log line; bare long numbers there are mostly
# version stamps, digests and UIDs, so those places leave the "number" kind out
PERSONAL = ("email", "date", "name", "identifier")


def redact(text: str, kinds_to_find: tuple[str, ...] | None = None) -> tuple[str, list[str]]:
    """``text`` with each identifier-like span replaced by ``(<kind> removed)``, and the kinds removed
    (all kinds, or only ``kinds_to_find``)."""
    kinds = []
    for pat, kind in PATTERNS:
        if kinds_to_find is not None and kind not in kinds_to_find:
            continue
        if pat.search(text):
            kinds.append(kind)
            text = pat.sub(f"({kind} removed)", text)
    return text, list(dict.fromkeys(kinds))


def safe_file_name(name: str) -> str:
    """``name`` (a basename), or ``image`` plus its suffixes when the name looks like it holds an
    identifier ("Smith_John_1970-01-01.jpg", "MRN-00123456.dcm"): the record keeps no such name."""
    p = Path(name)
    suffix = "".join(p.suffixes[-2:]) if p.suffixes else ""
    stem = name[: len(name) - len(suffix)] if suffix else name
    readable = re.sub(r"[_.]+", " ", stem)
    return ("image" + suffix) if find_identifiers(readable) else name


# in ids, a record-number keyword glued to its digits ("mrn1234567", "NHS_4471093") names a patient;
# a generic "id"/"case"/"subject"/"accession" with a number ("ID_0001", "case_id_12") is a study code
_RECORD_NUMBER = re.compile(r"(?i)(?<![a-z])(?:mrn|nhs|ssn|hospital[ _-]?(?:no|number)|medical[ _-]?record)"
                            r"[ _:#-]*(?:no\.?|number)?[ _:#-]*\d{4,}")
# DICOM's person-name form, family^given^middle ("DOE^JANE^MARIE", a file named after its PatientName)
_PERSON_NAME = re.compile(r"[^\W\d_]{2,}\^[^\W\d_]{2,}")
# words after "patient" that say the name was removed ("Patient_Anon"): not a name
_ANON = re.compile(r"(?i)\bpatient\s+(?:anon\w*|unknown|test|x+|\d+)\b")


def identifier_kinds_in_name(name: str) -> list[str]:
    """Personal identifier kinds in an id or file name, read with ``_`` and ``.`` as spaces
    ("Smith_John_19700101" -> ["date"]): e-mails, dates, names after a title or "patient", and record
    numbers. Generic study codes ("ID_0001", "case_id_12", "Accession_7") are not identifiers here."""
    readable = re.sub(r"[_.]+", " ", name)
    kinds: list[str] = []
    for text in (readable, name):
        for pat, kind in PATTERNS:
            if kind not in ("email", "date", "name"):
                continue
            for m in pat.finditer(text):
                if kind == "name" and _ANON.search(m.group(0)):
                    continue
                kinds.append(kind)
    if _RECORD_NUMBER.search(readable) or _RECORD_NUMBER.search(name):
        kinds.append("identifier")
    if _PERSON_NAME.search(name):
        kinds.append("name")
    return list(dict.fromkeys(kinds))


def redact_log_line(text: str) -> tuple[str, list[str]]:
    """A log line without personal identifiers (the kinds of ``identifier_kinds_in_name``). Ids come
    with ``_`` and ``.`` between words ("image=MRN_1234567"), so a line that holds one is logged in that
    readable form, redacted. Timestamps (a date followed by a time) are a log's own, not a birth date."""
    # patient context in a logged request ("Infer Request: {... 'patient': {'clinical_history': ...}}"): never
    # logged, valid or not (a refused "NHS number 943 476 5919" was written verbatim, and served by GET /logs/)
    text, n_ctx = _PATIENT_VALUES.subn(lambda m: f"{m.group(1)}'(removed)'", text)
    stamps: list[str] = []

    def keep(m: re.Match) -> str:
        stamps.append(m.group(0))
        return f"\x00{len(stamps) - 1}\x00"

    held = _TIMESTAMP.sub(keep, text)
    kinds = identifier_kinds_in_name(held)
    if not kinds:  # the common case: the line as it was
        return text, (["patient context"] if n_ctx else [])
    # word by word (a word: what lies between spaces, quotes, '=', '&', ',', ';', '/' or '?'): only a word that holds an
    # identifier is rewritten in its readable form; the rest of the line keeps its '_' and '.' (every path and
    # key of such a line had read "/tmp/probe vol", "client id", "nii gz")
    out = []
    for word in re.split(r"([\s'\"=&,;/?]+)", held):
        if not word or re.fullmatch(r"[\s'\"=&,;/?]+", word):
            out.append(word)
            continue
        mailed = redact(word, ("email",))[0]  # e-mails before their dots become spaces
        readable = re.sub(r"(?<=\w)[_.](?=\w)", " ", mailed)
        if mailed != word or identifier_kinds_in_name(readable):
            # the whole word: an id holding a date or record number holds the name beside it too
            # ("Doe_Jane_MRN48213977" had been logged as "Doe Jane (identifier removed)")
            lead = re.match(r"[(\[{]*", word).group(0)
            trail = re.search(r"[)\]}:.]*$", word).group(0)
            word = f"{lead}(identifier removed){trail}"
        out.append(word)
    clean = redact("".join(out), ("date", "name"))[0]  # names written as words ("Jane Doe")
    clean = _RECORD_NUMBER.sub("(identifier removed)", clean)
    return re.sub("\x00(\\d+)\x00", lambda m: stamps[int(m.group(1))], clean), kinds


_PATIENT_VALUES = re.compile(
    r"""(['"](?i:patient|patient_?name|name|clinical_?history|history|dob|birth_?date|date_of_birth|gender|sex|age|"""
    r"""indication)['"]\s*[:=]\s*)(\{[^{}]*\}|'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?|true|false|True|False)""")
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?")

"""Log lines without patient identifiers: request lines and messages name image ids and file names
that a client chose ("PUT /datastore/image?image=Smith_John_1970-01-01"); every handler the server
has gets a filter that replaces identifier-like spans (dates, e-mails, "patient X", "MRN 123", also
written with underscores) before the line is written. Bare numbers are left alone: in logs they are
versions, digests, UIDs; and a timestamp is the log's own."""

from __future__ import annotations

import logging

from tumorlens.findings.identifiers import redact_log_line


class RedactIdentifiers(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a malformed record is logging's own problem; pass it on unchanged
            return True
        clean, kinds = redact_log_line(msg)
        if kinds:
            record.msg, record.args = clean, ()
        return True


def install_log_redaction() -> int:
    """Add the filter to every handler of every logger configured now; returns how many handlers."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    n = 0
    for lg in loggers:
        for h in lg.handlers:
            if not any(isinstance(f, RedactIdentifiers) for f in h.filters):
                h.addFilter(RedactIdentifiers())
                n += 1
    return n

"""Note texts that one stage writes into the findings and a later stage (the report's limitations)
recognises; kept here, free of heavy imports, so both sides use the same words."""

HEAD_TEMPLATE_FAILED = "no pose matches the MNI152 head template"

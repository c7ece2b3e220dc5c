"""Foundations every stage uses: user errors, secret redaction, the machine, run records."""

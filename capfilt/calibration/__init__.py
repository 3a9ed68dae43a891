"""Choosing the filter's threshold from an audited sample of a round's texts."""

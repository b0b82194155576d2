"""Targets. Each is checked against the reference interpreter; none is imported by passes."""

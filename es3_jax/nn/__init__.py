"""Shared building blocks of the SAM3 tracker and the student modules."""

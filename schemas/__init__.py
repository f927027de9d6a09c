"""Data contracts between the stages: Arrow schemas of the tables and the dataset card's JSON schema.

Version 1; see docs/format.md. Bump ``SCHEMA_VERSION`` when a field changes meaning.
"""

from .tables import (
    CLASSES_SCHEMA,
    INPUTS_SCHEMA,
    MANIFEST_SCHEMA,
    PLAN_SCHEMA,
    REJECT_REASONS,
    REJECTS_SCHEMA,
    SCHEMA_VERSION,
    STATUS_SCHEMA,
    card_schema,
)

__all__ = [
    "CLASSES_SCHEMA",
    "INPUTS_SCHEMA",
    "MANIFEST_SCHEMA",
    "PLAN_SCHEMA",
    "REJECT_REASONS",
    "REJECTS_SCHEMA",
    "SCHEMA_VERSION",
    "STATUS_SCHEMA",
    "card_schema",
]

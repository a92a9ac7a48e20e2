"""Pseudonyms for patient and series identifiers.

Patient identifiers read from DICOM headers (``PHI_TAGS``) never leave this package in
clear text: readers keep only ``pseudonymize(value)``, a keyed hash (HMAC-SHA256) that is
stable across runs and cannot be reversed without the salt. A hospital that needs to link
pseudonyms back to patients keeps its own salt and an explicit, user-requested map.
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["PHI_TAGS", "pseudonymize", "series_pseudonym"]

#: DICOM keywords that identify a patient (or can be linked to one). Audits check that none
#: of their values appear in datalists, logs, file names or outputs.
PHI_TAGS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "MedicalRecordLocator",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "InstitutionName",
    "InstitutionAddress",
)


def pseudonymize(value: str, salt: str = "monai-mask", *, prefix: str = "P") -> str:
    """Stable, irreversible pseudonym of an identifier.

    Args:
        value: the identifier (e.g. a DICOM PatientID), any string.
        salt: HMAC key; pseudonyms from different salts cannot be linked. Default "monai-mask".
        prefix: leading letter of the pseudonym, "P" for patients, "S" for series.

    Returns:
        ``prefix`` followed by the first 12 hex digits of HMAC-SHA256(salt, value),
        e.g. ``"P3f2a9c01b7de"``.
    """
    if not isinstance(value, str):
        raise TypeError(f"pseudonymize expects a str, got {type(value).__name__}")
    digest = hmac.new(salt.encode("utf-8"), value.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"{prefix}{digest[:12]}"


def series_pseudonym(series_key: str, salt: str = "monai-mask") -> str:
    """Case id of a DICOM series: ``"S"`` + 12 hex digits of the keyed hash of its UID."""
    return pseudonymize(series_key, salt, prefix="S")

"""The UIDs the product names: transfer syntaxes, the service classes it speaks, and the common storage SOP
classes a spool destination accepts before it has learned what its cloud destination accepts.

SOP class and transfer syntax UIDs identify kinds of objects and encodings, never patients: they may
appear in logs, metrics and status. Instance UIDs (SOP instance, series, study) are identifiers and may not.
"""

from __future__ import annotations

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

# The product's implementation class UID (a UUID-derived UID, PS3.5 §B.2): one value for every version;
# the version name says which (the agent fills in its version).
IMPLEMENTATION_CLASS_UID = "2.25.57736118667123254350919962985700389220"
IMPLEMENTATION_VERSION_PREFIX = "DICOMTUNNEL_"  # + the version, cut to the field's 16 characters

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"  # retired, still sent by old devices
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
DEFAULT_TRANSFER_SYNTAXES = (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN)

VERIFICATION = "1.2.840.10008.1.1"
STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"

# The storage SOP classes most modalities and PACS send (PS3.4 Annex B.5), by their standard names.
COMMON_STORAGE_SOP_CLASSES: dict[str, str] = {
    "ComputedRadiographyImageStorage": "1.2.840.10008.5.1.4.1.1.1",
    "DigitalXRayImageStorageForPresentation": "1.2.840.10008.5.1.4.1.1.1.1",
    "DigitalXRayImageStorageForProcessing": "1.2.840.10008.5.1.4.1.1.1.1.1",
    "DigitalMammographyXRayImageStorageForPresentation": "1.2.840.10008.5.1.4.1.1.1.2",
    "DigitalMammographyXRayImageStorageForProcessing": "1.2.840.10008.5.1.4.1.1.1.2.1",
    "DigitalIntraOralXRayImageStorageForPresentation": "1.2.840.10008.5.1.4.1.1.1.3",
    "CTImageStorage": "1.2.840.10008.5.1.4.1.1.2",
    "EnhancedCTImageStorage": "1.2.840.10008.5.1.4.1.1.2.1",
    "UltrasoundMultiFrameImageStorage": "1.2.840.10008.5.1.4.1.1.3.1",
    "MRImageStorage": "1.2.840.10008.5.1.4.1.1.4",
    "EnhancedMRImageStorage": "1.2.840.10008.5.1.4.1.1.4.1",
    "UltrasoundImageStorage": "1.2.840.10008.5.1.4.1.1.6.1",
    "SecondaryCaptureImageStorage": "1.2.840.10008.5.1.4.1.1.7",
    "MultiFrameGrayscaleByteSecondaryCaptureImageStorage": "1.2.840.10008.5.1.4.1.1.7.2",
    "MultiFrameGrayscaleWordSecondaryCaptureImageStorage": "1.2.840.10008.5.1.4.1.1.7.3",
    "MultiFrameTrueColorSecondaryCaptureImageStorage": "1.2.840.10008.5.1.4.1.1.7.4",
    "GrayscaleSoftcopyPresentationStateStorage": "1.2.840.10008.5.1.4.1.1.11.1",
    "XRayAngiographicImageStorage": "1.2.840.10008.5.1.4.1.1.12.1",
    "XRayRadiofluoroscopicImageStorage": "1.2.840.10008.5.1.4.1.1.12.2",
    "BreastTomosynthesisImageStorage": "1.2.840.10008.5.1.4.1.1.13.1.3",
    "NuclearMedicineImageStorage": "1.2.840.10008.5.1.4.1.1.20",
    "RawDataStorage": "1.2.840.10008.5.1.4.1.1.66",
    "SegmentationStorage": "1.2.840.10008.5.1.4.1.1.66.4",
    "VLPhotographicImageStorage": "1.2.840.10008.5.1.4.1.1.77.1.4",
    "BasicTextSRStorage": "1.2.840.10008.5.1.4.1.1.88.11",
    "EnhancedSRStorage": "1.2.840.10008.5.1.4.1.1.88.22",
    "ComprehensiveSRStorage": "1.2.840.10008.5.1.4.1.1.88.33",
    "KeyObjectSelectionDocumentStorage": "1.2.840.10008.5.1.4.1.1.88.59",
    "EncapsulatedPDFStorage": "1.2.840.10008.5.1.4.1.1.104.1",
    "PositronEmissionTomographyImageStorage": "1.2.840.10008.5.1.4.1.1.128",
    "EnhancedPETImageStorage": "1.2.840.10008.5.1.4.1.1.130",
    "RTImageStorage": "1.2.840.10008.5.1.4.1.1.481.1",
    "RTDoseStorage": "1.2.840.10008.5.1.4.1.1.481.2",
    "RTStructureSetStorage": "1.2.840.10008.5.1.4.1.1.481.3",
    "RTPlanStorage": "1.2.840.10008.5.1.4.1.1.481.5",
}


def is_uid(value: str) -> bool:
    """A UID as PS3.5 §9.1 allows it: 1-64 characters, digits and dots, no empty or zero-led component."""
    if not 0 < len(value) <= 64:
        return False
    parts = value.split(".")
    return all(p.isdigit() and p.isascii() and (p == "0" or not p.startswith("0")) for p in parts)

"""The synthetic head-and-neck phantom: analytic cases in the SegRap release layout (``cases``) and as
DICOM CT series (``dicom_series``). All test and demo data comes from here.

May import: errors, arrays, anatomy, formats. Not inference, the pipeline or anything above.
"""

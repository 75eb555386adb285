"""The file-format layer: CT reading and checks, DICOM series discovery, RTSTRUCT writing and reading with
its contour tracing, Slicer's .seg.nrrd, and the challenge's mask formats.

May import: errors, arrays, anatomy. Never inference, the pipeline or anything above.
"""

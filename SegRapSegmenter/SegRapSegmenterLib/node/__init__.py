"""The DICOM auto-contouring node: CT studies in (``segrap serve``), RTSTRUCT out (``segrap send``).

An application layer beside the CLI: it may import pipeline, runner/worker, formats, anatomy, errors
and arrays; never cli or slicer_bridge (they import it).
"""

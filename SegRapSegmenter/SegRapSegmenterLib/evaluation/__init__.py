"""The evaluation layer: SegRap's DSC and NSD, evaluation runs over predicted and reference cases, and
their plots (which take plain data).

May import: errors, arrays, anatomy, formats. Not inference or the pipeline.
"""

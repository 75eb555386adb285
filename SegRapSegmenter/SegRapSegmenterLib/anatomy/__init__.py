"""The anatomy layer: the catalogue of the 47 structures, the exact 45 <-> 54 class decomposition,
Slicer terminology generated from it, and the QA rules (empty, laterality).

May import: errors, arrays. Nothing above (no file formats, no inference).
"""

"""SegRapSegmenterLib: the headless core of the SegRap head-and-neck auto-contouring extension.

Never imports slicer, qt or ctk (except ``scene``, which imports MRML classes only).
"""

__version__ = "0.1.0"

"""The bridge to 3D Slicer: MRML scene glue (``scene``: slicer MRML classes only, never qt), the
Slicer logic (``logic``: asynchronous worker runs, cancel, export) and dependency probing and installs.

May import every core layer below the applications (pipeline, runner, formats, inference, anatomy, ...).
Nothing in the core imports it.
"""

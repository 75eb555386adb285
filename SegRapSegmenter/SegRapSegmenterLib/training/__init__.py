"""The training recipe: SegRap release -> nnU-Net datasets, fine-tuning trainers, bundles from results,
and the recipe that rebuilds the demo bundle on the phantom.

May import every core layer below it (demo, pipeline, inference, formats, anatomy, phantom, ...); only
the CLI imports it.
"""

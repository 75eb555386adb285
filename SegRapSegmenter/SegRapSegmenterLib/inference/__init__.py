"""The inference layer: model bundles and their store (manifest, checksums, install), and the predictor
(nnU-Net's network and preprocessing, streamed tiles, labels from per-slice scores, body box).

May import: errors, arrays, anatomy. Not formats (inputs arrive as SimpleITK images), nor anything above.
"""

"""The training recipe: SegRap release -> nnU-Net datasets, fine-tuning trainers, bundles from results."""

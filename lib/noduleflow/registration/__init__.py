"""Stage 2: follow-ups registered to their baseline, registration QC, nodule boxes in registered space."""

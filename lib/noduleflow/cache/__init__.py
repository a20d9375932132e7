"""Stage 3: the patch and volume caches, the datasets over them, and the reference segmenter."""

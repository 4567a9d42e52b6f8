"""Model files and their metadata, pre-processing, the one network definition, inference backends."""

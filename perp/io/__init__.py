"""Low-level I/O shared by every stage: hashing, atomic outputs, cache locations, S3 downloads."""

"""TEST DOUBLE package: stands in for 3FS's ``hf3fs_fuse`` (see tests/doubles/README.md)."""

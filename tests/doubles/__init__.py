"""Test doubles of what cannot run here (3FS's USRBIO client, an RDMA device); see README.md."""

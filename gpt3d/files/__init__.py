"""Files gpt3d writes and checks: crash-safe, link-safe writes (atomic) and content checksums (checksum)."""

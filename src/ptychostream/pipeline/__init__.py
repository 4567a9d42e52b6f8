"""The data path: receive → queue → batch and infer → publish → stitch and record."""

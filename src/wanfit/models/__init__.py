"""Model definitions: one model to a file, device-agnostic."""

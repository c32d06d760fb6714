"""Typed, versioned files that runs write and read: provenance, run folders, scores."""

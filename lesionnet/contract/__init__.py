"""Typed, versioned files the project writes and reads, one writer and one reader each: split.csv, a run's
metrics.json, scores.json, the gate files, oof_scores.json, the on-device policy and export sidecar; provenance.

Below ``data`` in the layers: nothing here imports the rest of the project (the run folder that applies these
files to the data is ``lesionnet.data.run_folder``)."""

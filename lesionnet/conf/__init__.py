"""Hydra configs of LesionNet (package data, so an installed wheel carries them; ``pkg://lesionnet.conf``)."""

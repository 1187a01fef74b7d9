"""Generators of the bundled artefacts (tiny VAE, CLIP vocabulary); not part of the installed package."""

"""Recipes that build moeflow's shipped artefacts. Not installed: run from the repository root."""

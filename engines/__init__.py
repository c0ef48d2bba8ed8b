"""Adapters between ExpertPlane and the inference engines users run."""

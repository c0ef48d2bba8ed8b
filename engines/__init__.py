"""Engine integrations: ExpertPlane plans carried out by the inference engines' own movers."""

"""Training: the shared loop and the two stages that plug into it."""

"""Step 1, supervised fine-tuning: the π_SFT that RL starts from and regularises towards (no Ray here)."""

"""Small numerical studies that reproduce a paper's simulation outside the RLHF pipeline."""

"""Image-variation metrics as the RIVAL paper reports them: CLIP scores, palette distance, KID, diversity."""

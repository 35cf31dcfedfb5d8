"""Patch-DM (papers/patch_dm.txt): patch diffusion with feature collage."""

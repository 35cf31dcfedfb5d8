"""∞-Diff (papers/infty_diff.txt): mollified diffusion on sparse pixel subsets."""

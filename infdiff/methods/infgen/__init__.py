"""InfGen (papers/infgen_supplement.txt): `vae` (stage vae, an SD-layout KL-f8 VAE trained
from scratch when no Stable Diffusion weights are at hand) and `decoder` (stage infgen, the
any-resolution transformer decoder on the frozen VAE encoder). Latent generators whose
samples it decodes are `infdiff.methods.latent_ddpm` runs on the same VAE."""

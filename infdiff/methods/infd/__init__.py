"""INFD (papers/infd.txt): `autoencoder` (stage infd_ae); its latent DDPM (stage infd_ldm) is
the shared `infdiff.methods.latent_ddpm`."""

"""INFD (papers/infd.txt): `autoencoder` (stage infd_ae) and `ldm` (stage infd_ldm)."""

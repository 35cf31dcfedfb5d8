"""INFD: Image Neural Field Diffusion (papers/infd.txt; METHODS.md: INFD).

Stages (both in `config.stages` for the demo; paper scale trains them one at a time):
  infd_ae   LDM-style VQ-f4 (or KL) autoencoder whose decoder gives a feature map phi,
            rendered by CLIF at any coordinates; L1 + LPIPS + codebook + hinge PatchGAN.
  infd_ldm  DDPM (ADM UNet, eps-prediction) on the un-quantised latent of a finished
            infd_ae run; DDIM sampling, decode to phi, tiled CLIF render at any size.

Presets (comma-separated after the colon):
  configs/infd.py             infd_ae at paper scale (FFHQ-like folder data)
  configs/infd.py:ldm         infd_ldm at paper scale; set infd_ldm.stage1_workdir
  configs/infd.py:demo        both stages, tiny, on the built-in shapes, 2-core CPU
  configs/infd.py:demo,fix_r=True      the paper's Fix-1024 ablation (r = r_max)
  configs/infd.py:demo,clif_norm=group GroupNorm CLIF (the paper's; demo default: none)
  configs/infd.py:demo,bottleneck=vq   VQ bottleneck (the paper's; demo default: kl)
  configs/infd.py:demo,f=4             the paper's f4 latent in the demo (demo default: f1)
The paper configuration needs a VGG16-LPIPS directory (lpips=DIR or lpips=none) and
refuses to start without one (config.required_paths, checked by infdiff/main.py).
"""

import ml_collections

from infdiff import config_lib
from infdiff.data.pipeline import default_data_config

PRESETS = dict(
    demo=False,  # tiny sizes for a 2-core CPU, both stages in one command
    ldm=False,  # train the latent DDPM only (paper scale runs the stages separately)
    fix_r=False,  # Fix-1024 ablation: the target side r is always r_max
    bottleneck="",  # 'vq' (paper main setting, VQ-f4) or 'kl'; '' = vq, demo: kl
    clif_norm="",  # CLIF norm: 'group' (paper) or 'none' (seamless tiles); '' = group, demo: none
    f=0,  # latent downsampling factor 1, 2 or 4; 0 = 4 (paper), demo: 1
    lpips="",  # VGG16-LPIPS checkpoint directory; 'none' = no LPIPS term
)


def ae_config(p) -> ml_collections.ConfigDict:
  """Stage 1, `infd_ae` (METHODS.md: INFD; LDM VQ-f4 first-stage config)."""
  demo = p.demo
  c = ml_collections.ConfigDict()
  c.dtype = "float32"  # compute dtype (the official code trains in float32)
  c.batch_size = 4 if demo else 8  # paper: 8
  # Data (`INFDPatch`): the encoder sees the whole image resized to enc_size; the target
  # side r ~ U[enc_size, min(image side, r_max)], the image resized to r and a random
  # patch x patch crop supervised at its pixel centres with cell 2 / r.
  c.enc_size = 32 if demo else 256  # paper: 256
  c.r_max = 128 if demo else 1024  # paper: 1024
  c.patch = 32 if demo else 256  # supervised crop side P (paper: 256)
  c.fix_r = p.fix_r  # Fix-1024 ablation: r = r_max always
  # Balance of mixed-resolution folders: this fraction of samples comes from the images
  # whose short side is at least r_max (the paper's high-resolution subset).
  c.hires_fraction = 0.5
  # LDM encoder/decoder (ch 128, mult (1, 2, 4), 2 ResBlocks per level, no attention in
  # the levels, middle ResBlock-attention-ResBlock, GroupNorm-32 eps 1e-6, swish).
  c.ae = ml_collections.ConfigDict(
      dict(
          ch=32 if demo else 128,
          # Downsampling factor 2^(len - 1): paper f4. The demo keeps the 32^2 grid (f1, as
          # RaPD's latent): its shapes are 5-17 px wide, so at f4 a shape is one or two latent
          # cells of 3 numbers, and 1500 CPU steps (KL, norm-free CLIF, bicubic base, no GAN;
          # recon --num=16) reached 2x / 4x PSNR 24.0 / 23.5 dB at f2 and 32.8 / 30.9 dB at f1
          # against bicubic 33.0 / 30.7 dB; f1 with 2000 steps 33.3 / 31.0 dB (README: INFD
          # on the demo).
          ch_mult={1: (1,), 2: (1, 2), 4: (1, 2, 4)}[p.f or (1 if demo else 4)],
          num_res_blocks=1 if demo else 2,
          attn_resolutions=(),  # feature sides with attention inside the levels (none)
          z_channels=3,  # latent channels
          norm_groups=8 if demo else 32,  # GroupNorm groups (LDM: 32)
          dropout=0.0,
      )
  )
  # 'vq' | 'kl'. The demo uses KL: its short run collapsed the LDM-initialised VQ codebook
  # (codes in +-1/K; at f4, 30 of 256 codes in use and a flat render, README).
  c.bottleneck = p.bottleneck or ("kl" if demo else "vq")
  c.vq = ml_collections.ConfigDict(
      dict(
          num_codes=256 if demo else 8192,  # codebook size (paper: 8192 x 3)
          beta=0.25,  # LDM legacy quantiser: beta on the codebook term (METHODS.md)
          weight=1.0,  # weight of the codebook loss in the generator loss
      )
  )
  # KL bottleneck weight (LDM KL-f4: 1e-6), relative to LDM's reconstruction summed over
  # the pixels of an image; the loss averages it, so it divides this by the values per target.
  c.kl_weight = 1e-6
  # CLIF: nearest phi feature + relative coordinate and cell scaled to phi's grid ->
  # conv3x3 -> 2 pre-activation ResBlocks -> norm, swish, conv3x3 -> RGB.
  c.renderer = ml_collections.ConfigDict(
      dict(
          name="clif",
          features=64 if demo else 256,  # conv width (official CLIF: 256)
          n_resblocks=2,
          # 'group' (paper) or 'none' (exactly seamless tiles). The demo uses 'none': the
          # GroupNorm CLIF normalises each supervised patch, and the short run lost the
          # background colour of every scene (README: INFD on the demo).
          norm=p.clif_norm or ("none" if demo else "group"),
          norm_groups=8 if demo else 32,
          # Residual base (not in INFD): add a bicubic interpolation of a learned linear RGB
          # projection of phi ('none' | 'bilinear' | 'bicubic').
          rgb_base="bicubic" if demo else "none",
      )
  )
  c.render_pad = 8  # tile halo for GroupNorm CLIF renders (paper: pad 8)
  lpips_path = "" if p.lpips == "none" else p.lpips
  use_lpips = p.lpips != "none" and (bool(lpips_path) or not demo)
  c.lpips_weight = 1.0 if use_lpips else 0.0  # LPIPS weight (LDM/INFD: 1.0)
  c.lpips_path = lpips_path
  # Hinge PatchGAN (METHODS.md: INFD): generator term gan_weight * w_ada * (-mean D(pred)),
  # w_ada = ||g_rec|| / (||g_gan|| + eps) at the renderer's output conv kernel, clamped.
  c.gan = ml_collections.ConfigDict(
      dict(
          # disc_weight (paper 0.75). The demo trains without the GAN term: from step 0 it cost
          # the short run 4 dB of PSNR at 1x (README); the tests exercise it.
          weight=0.0 if demo else 0.75,
          start=0,  # step at which the GAN terms switch on (paper: 0)
          ada_eps=1e-4,
          ada_max=1e4,
          ndf=16 if demo else 64,
          n_layers=2 if demo else 3,
          kernel=4,
      )
  )
  # Adam (0.5, 0.9), lr 3.6e-5 (paper: 4.5e-6 x batch 8), no clipping, no EMA. The demo's
  # short CPU run uses a larger constant rate.
  c.optim = config_lib.optim_config(
      lr=1e-3 if demo else 3.6e-5, total_steps=0, schedule="cosine" if demo else "constant"
  )
  c.optim.b1, c.optim.b2, c.optim.grad_clip = 0.5, 0.9, 0.0
  c.disc_optim = config_lib.optim_config(lr=1e-3 if demo else 3.6e-5, total_steps=0)
  c.disc_optim.b1, c.disc_optim.b2, c.disc_optim.grad_clip = 0.5, 0.9, 0.0
  c.ema_decay = 0.0  # no EMA in stage 1
  # Latent statistics after training (infd_ae/latent_stats.json; read by infd_ldm when its
  # scale_factor is 0).
  c.stats_images = 256 if demo else 10_000
  c.stats_batch_size = 16
  return c


def ldm_config(p) -> ml_collections.ConfigDict:
  """Stage 2, `infd_ldm` (METHODS.md: INFD, stage 2)."""
  demo = p.demo
  c = ml_collections.ConfigDict()
  c.dtype = "float32"
  c.batch_size = 16 if demo else 48  # paper: 48
  c.stage1_workdir = ""  # finished infd_ae run; '' = the sibling workdir/infd_ae
  c.autoencoder_stage = "infd_ae"  # the stage whose latent is modelled
  c.decoder_stage = ""  # stage that draws the samples; '' = the autoencoder's CLIF render
  c.decoder_workdir = ""  # its run when not beside this stage
  c.unet = ml_collections.ConfigDict(
      dict(
          ch=32 if demo else 224,
          channel_mult=(1, 2, 2) if demo else (1, 2, 3, 4),
          num_res_blocks=1 if demo else 2,
          attention_resolutions=(8,) if demo else (32, 16, 8),  # sides at the latent size
          head_channels=16 if demo else 32,  # channels per head (paper: 32)
          norm_groups=8 if demo else 32,
          dropout=0.0,
      )
  )
  c.diffusion = ml_collections.ConfigDict(
      dict(
          num_steps=1000,  # T
          beta_start=0.0015,
          beta_end=0.0195,  # linear betas (LDM)
          parameterization="eps",
      )
  )
  # Latent multiplier before diffusion. LDM's VQ-f4 (the paper): 1.0, not rescaled. 0 means
  # 1 / (overall std of the autoencoder's latent) from infd_ae/latent_stats.json (LDM's
  # scale_by_std); the demo's short stage 1 leaves a latent of std ~0.1, where unit noise
  # drowns the data at every timestep but the first few.
  c.scale_factor = 0.0 if demo else 1.0
  c.optim = config_lib.optim_config(
      lr=1e-3 if demo else 9.6e-5,  # paper: 9.6e-5 (AdamW)
      total_steps=0,
      warmup=100 if demo else 0,
      schedule="cosine" if demo else "constant",
  )
  c.optim.weight_decay = 0.01
  c.optim.grad_clip = 0.0
  c.ema_decay = 0.999 if demo else 0.9999
  c.sample = ml_collections.ConfigDict()
  c.sample.num_steps = 50 if demo else 200  # DDIM steps (paper: 200)
  c.sample.eta = 1.0  # DDIM eta (paper: 1)
  c.sample.batch_size = 8  # latents denoised per compiled call
  c.sample.tile = 64 if demo else 256  # render tile side (paper: 256)
  c.sample.max_size = 8192  # largest side the sample CLI accepts
  c.sample.sizes = (32, 64, 128) if demo else (256, 512, 1024)  # final grids
  c.sample.num = 16  # images per final grid
  return c


def get_config(arg=None):
  p = config_lib.parse_arg(arg, PRESETS)
  c = config_lib.base_config()
  c.stages = ("infd_ldm",) if p.ldm else ("infd_ae",)
  c.data = default_data_config()
  c.data.source = "shapes" if p.demo else "folder:/path/to/ffhq"  # see README: data sources
  c.infd_ae = ae_config(p)
  c.infd_ldm = ldm_config(p)
  c.total_steps = 400_000 if p.ldm else 200_000  # steps of the stage being trained
  c.checkpoint_every = 5000
  c.log_every = 100
  c.infd_ldm.optim.decay_steps = c.get_ref("total_steps")
  need = config_lib.required_path
  c.required_paths = ml_collections.ConfigDict(
      dict(
          lpips=need(
              "infd_ae.lpips_path",
              when="infd_ae.lpips_weight",
              stage="infd_ae",
              what="VGG16-LPIPS",
              give="lpips=DIR",
              off="lpips=none",
          ),
      )
  )
  # Cosine schedules end with their stage. (Set once: assigning a reference to a field
  # that already holds one would re-link the first reference instead.)
  if p.demo:
    c.infd_ae.total_steps = 2000  # stage 1 of the demo (stage 2: total_steps)
    c.infd_ae.optim.decay_steps = c.infd_ae.get_ref("total_steps")
  else:
    c.infd_ae.optim.decay_steps = c.get_ref("total_steps")
  if p.demo:
    c.stages = ("infd_ae", "infd_ldm")  # one command: autoencoder, then latent DDPM
    c.data.shapes_size = c.infd_ae.get_ref("r_max")  # built-in shapes rendered at r_max
    # infd_ldm steps: its UNet on the 32^2 x 3 latent runs ~2x slower per step than stage 1
    # on a 2-core CPU; 1000 keeps both stages and the install within 15 minutes.
    c.total_steps = 1000
    c.checkpoint_every = 500
    c.log_every = 50
    c.mesh = (-1, 1, 1)
  return c

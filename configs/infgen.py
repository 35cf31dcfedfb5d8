"""InfGen: any-resolution decoding of a fixed-size VAE latent (papers/infgen_supplement.txt;
METHODS.md: InfGen).

Stages:
  vae          the Stable Diffusion VAE architecture (KL-f8, 4 latent channels) trained from
               scratch: L1 + LPIPS + KL (the demo's VAE; with real SD weights skip it)
  infgen       InfGen's decoder on the frozen VAE encoder: latent tokens, mask tokens per
               8 x 8 output block, N cross-attention blocks, SD mid + up blocks; trained on
               windows of images resized to random sizes and aspect ratios
  latent_ddpm  a DDPM on the VAE's latent (the same stage INFD uses); its samples are
               decoded by InfGen at any size (`latent_ddpm.decoder_stage=infgen`)

Presets (comma-separated after the colon):
  configs/infgen.py:vae=DIR            infgen at paper scale on a frozen SD1.x / SDXL VAE (a
                                       diffusers AutoencoderKL directory), encoder input 512
  configs/infgen.py:vae=DIR,lpips=DIR  ... with the LPIPS term (lpips=none: L1 only)
  configs/infgen.py:ldm                latent_ddpm at paper scale on a `vae` run
                                       (latent_ddpm.stage1_workdir) decoded by an infgen run
                                       (latent_ddpm.decoder_workdir)
  configs/infgen.py:demo               vae, infgen and latent_ddpm on the built-in shapes,
                                       one command on a 2-core CPU
Paper scale refuses to start without the VAE and LPIPS directories (or lpips=none).

Not given by the supplement, chosen here: N, the head count, the position embedding
(a shared 2-D sin-cos code of continuous coordinates + Linear), pre-LN blocks, the loss
(L1 + LPIPS, no GAN) and the schedule.
"""

import ml_collections

from infdiff import config_lib
from infdiff.data.pipeline import default_data_config

PRESETS = dict(
    demo=False,  # tiny sizes for a 2-core CPU, all three stages in one command
    ldm=False,  # train the latent DDPM only
    vae="",  # diffusers AutoencoderKL directory (SD1.x / SDXL `vae` folder) for paper scale
    lpips="",  # VGG16-LPIPS checkpoint directory; 'none' = no LPIPS term
)


def _lpips(p, demo: bool) -> tuple[float, str]:
  path = "" if p.lpips == "none" else p.lpips
  on = p.lpips != "none" and (bool(path) or not demo)
  return (1.0 if on else 0.0), path


def vae_config(p) -> ml_collections.ConfigDict:
  """Stage `vae`: the SD VAE architecture trained from scratch."""
  demo = p.demo
  c = ml_collections.ConfigDict()
  c.dtype = "float32"
  c.batch_size = 8
  c.enc_size = 64 if demo else 256  # training image side (SD's VAE: 256)
  # diffusers AutoencoderKL fields. SD1.x / SDXL: (128, 256, 512, 512), 2, 4, 32. The demo
  # keeps the f8 factor and 4 channels (an 8 x 8 x 4 latent of a 64^2 image).
  c.model = ml_collections.ConfigDict(
      dict(
          block_out_channels=(16, 32, 64, 64) if demo else (128, 256, 512, 512),
          layers_per_block=1 if demo else 2,
          latent_channels=4,
          norm_num_groups=8 if demo else 32,
          mid_block_add_attention=True,
      )
  )
  # KL weight as LDM's (relative to a reconstruction summed over the pixels; SD's KL-f8
  # used 1e-6). The demo's larger weight keeps its tiny latent close to N(0, 1).
  c.kl_weight = 1e-4 if demo else 1e-6
  # Initial posterior log-variance (quant_conv bias; 0 = as initialised). Not SD's: a
  # posterior std of 1 at step 0 buries a short run's latent in sampling noise. The demo's
  # 1500 steps: 22.5 dB at -6 against 21.4 dB at 0 (README: InfGen on the demo).
  c.logvar_init = -6.0 if demo else 0.0
  # Reconstruction term on [-1, 1]: 'l1' (SD's) or 'l2'. The demo uses 'l2' (not SD's):
  # under L1 the decoder's best guess for a colour the latent does not carry yet is the
  # median, whose sign gradient gives the encoder no pull towards colour, and 1500 steps
  # kept every shape a dark blob (22.5 dB); squared error gives 27.1 dB with the colours
  # right (README: InfGen on the demo).
  c.recon_loss = "l2" if demo else "l1"
  c.lpips_weight, c.lpips_path = _lpips(p, demo)
  c.optim = config_lib.optim_config(
      lr=2e-3 if demo else 4.5e-6 * 8, total_steps=0, schedule="cosine" if demo else "constant"
  )
  c.optim.b1, c.optim.b2 = 0.5, 0.9  # LDM's autoencoder Adam
  c.ema_decay = 0.0
  c.stats_images = 256 if demo else 10_000  # latent statistics after training
  c.stats_batch_size = 16
  return c


def infgen_config(p) -> ml_collections.ConfigDict:
  """Stage `infgen`: the decoder (supplement Table 1)."""
  demo = p.demo
  c = ml_collections.ConfigDict()
  c.dtype = "float32"
  c.batch_size = 8 if demo else 32
  # Frozen encoder: 'sd' = the diffusers directory in vae_path (paper); 'run' = a finished
  # `vae` stage at vae_workdir ('' = beside this stage).
  c.vae_source = "run" if demo else "sd"
  c.vae_path = p.vae
  c.vae_workdir = ""
  c.enc_size = 64 if demo else 512  # encoder input side (supplement: 512 -> 64 x 64 x 4)
  c.sample_posterior = True  # y = mean + std eps (Table 1); False: the mean
  # Targets: a window of the image resized to H x W, H, W ~ U{r_min..r_max} (multiples of 8)
  # with aspect up to max_aspect; the window is patch x patch output pixels (a window larger
  # than a target overhangs it and the loss skips the overhang). The demo's 64^2 windows
  # (whole images at 1x) gave +2.3 to +2.9 dB over 32^2 ones at 1x-4x for about the same
  # step time (README: InfGen on the demo).
  c.r_min = 32 if demo else 256
  c.r_max = 256 if demo else 2048
  c.patch = 64 if demo else 256
  c.max_aspect = 2.0
  c.size_dist = "uniform"  # law of H: 'uniform' or 'log' (each octave equally often)
  c.decoder = ml_collections.ConfigDict(
      dict(
          width=64 if demo else 512,  # Table 1: 512
          depth=2 if demo else 4,  # N (not given)
          heads=4 if demo else 8,  # not given
          mlp_ratio=4.0,
          pos_dim=32 if demo else 256,  # sin-cos code width before its Linear
          up_channels=(64, 32, 32) if demo else (512, 256, 128),  # Table 1: 3 up blocks, 128 out
          layers_per_block=1 if demo else 2,  # ResBlocks per up block - 1 (SD: 2)
          norm_groups=8 if demo else 32,
          # 'group' (SD's blocks), 'layer' or 'none'. The demo uses 'none' and no mid
          # attention, so a tiled decode (any size, bounded memory) equals the whole one
          # exactly; with GroupNorm and attention, tiles use tile-local statistics (as
          # diffusers' tiled VAE decode does). GroupNorm over 32^2-64^2 training windows
          # scored 0.2-0.4 dB below per-pixel LayerNorm, which itself scored 1.5 dB below no
          # norm: it drops each pixel's feature magnitude before conv_out (README).
          tail_norm="none" if demo else "group",
          mid_attention=not demo,
          query_chunk=4096,  # mask tokens per cross-attention chunk
          # 'bicubic' (not InfGen): each mask token also gets the bicubic interpolation of
          # the latent features at its centre. Without it the demo's 800 CPU steps learned
          # only the background (sharpness 0.09-0.14, README: InfGen on the demo).
          query_init="bicubic" if demo else "none",
          zero_init=False,  # cross blocks' output Linears start at zero (not given)
          full_res_blocks=0,  # ResBlocks at the output resolution (Table 1: none)
      )
  )
  # 'l1' or 'l2' on [-1, 1], as the vae stage's recon_loss (the demo: 'l2', same reason)
  c.recon_loss = "l2" if demo else "l1"
  c.lpips_weight, c.lpips_path = _lpips(p, demo)
  c.optim = config_lib.optim_config(
      lr=1e-3 if demo else 1e-4, total_steps=0, warmup=100 if demo else 1000, schedule="cosine"
  )
  c.ema_decay = 0.999 if demo else 0.9999
  c.tile = 256  # render tile side (output pixels)
  return c


def ldm_config(p) -> ml_collections.ConfigDict:
  """Stage `latent_ddpm`: a DDPM on the VAE latent, decoded by InfGen."""
  demo = p.demo
  c = ml_collections.ConfigDict()
  c.dtype = "float32"
  c.batch_size = 16 if demo else 64
  c.stage1_workdir = ""  # the `vae` run ('' = beside this stage)
  c.autoencoder_stage = "vae"
  c.decoder_stage = "infgen"  # InfGen draws the samples at any size ('' = the VAE + bicubic)
  c.decoder_workdir = ""  # the `infgen` run ('' = beside this stage)
  c.unet = ml_collections.ConfigDict(
      dict(
          ch=32 if demo else 224,
          channel_mult=(1, 2) if demo else (1, 2, 3, 4),
          num_res_blocks=2,
          attention_resolutions=(4,) if demo else (32, 16, 8),
          head_channels=32,
          norm_groups=8 if demo else 32,
          dropout=0.0,
      )
  )
  c.diffusion = ml_collections.ConfigDict(
      dict(num_steps=1000, beta_start=0.0015, beta_end=0.0195, parameterization="eps")
  )
  c.scale_factor = 0.0  # 0: 1 / std of the VAE latent (vae/latent_stats.json)
  c.optim = config_lib.optim_config(
      lr=1e-3 if demo else 1e-4, total_steps=0, warmup=100 if demo else 0, schedule="cosine"
  )
  c.optim.weight_decay = 0.01
  c.optim.grad_clip = 1.0
  c.ema_decay = 0.999 if demo else 0.9999
  c.sample = ml_collections.ConfigDict()
  c.sample.num_steps = 50 if demo else 200  # DDIM steps
  c.sample.eta = 1.0
  c.sample.batch_size = 8
  c.sample.tile = 256
  c.sample.max_size = 8192
  c.sample.sizes = (64, 128, 256) if demo else (512, 1024, 2048)  # 1x, 2x, 4x the VAE input
  c.sample.num = 16
  return c


def get_config(arg=None):
  p = config_lib.parse_arg(arg, PRESETS)
  c = config_lib.base_config()
  c.data = default_data_config()
  c.data.source = "shapes" if p.demo else "folder:/path/to/laion_hr"  # README: data sources
  c.vae = vae_config(p)
  c.infgen = infgen_config(p)
  c.latent_ddpm = ldm_config(p)
  c.stages = ("latent_ddpm",) if p.ldm else ("infgen",)
  c.total_steps = 200_000
  c.checkpoint_every = 5000
  c.log_every = 100
  need = config_lib.required_path
  c.required_paths = ml_collections.ConfigDict(
      dict(
          vae=need(
              "infgen.vae_path",
              when="infgen.vae_source=sd",
              stage="infgen",
              what="diffusers AutoencoderKL",
              give="vae=DIR",
          ),
          lpips=need(
              "infgen.lpips_path",
              when="infgen.lpips_weight",
              stage="infgen",
              what="VGG16-LPIPS",
              give="lpips=DIR",
              off="lpips=none",
          ),
          vae_lpips=need(
              "vae.lpips_path",
              when="vae.lpips_weight",
              stage="vae",
              what="VGG16-LPIPS",
              give="lpips=DIR",
              off="lpips=none",
          ),
      )
  )
  if p.demo:
    c.stages = ("vae", "infgen", "latent_ddpm")
    c.data.shapes_size = c.infgen.get_ref("r_max")  # scenes rendered at the largest target
    # 1500 / 1200 / 700 steps took 983 s of training on an idle 2-core CPU (1079 s with the
    # install); 1000 / 1000 / 600 took 831 s with the install (README: InfGen on the demo).
    c.vae.total_steps = 1000
    c.infgen.total_steps = 1000
    c.total_steps = 600  # latent_ddpm
    c.checkpoint_every = 500
    c.log_every = 50
    c.vae.optim.decay_steps = c.vae.get_ref("total_steps")
    c.infgen.optim.decay_steps = c.infgen.get_ref("total_steps")
  else:
    c.vae.optim.decay_steps = c.get_ref("total_steps")
    c.infgen.optim.decay_steps = c.get_ref("total_steps")
  c.latent_ddpm.optim.decay_steps = c.get_ref("total_steps")
  return c

"""∞-Diff: infinite-resolution diffusion with subsampled mollified states.

(papers/infty_diff.txt; METHODS.md: ∞-Diff.)

Stages (both in `config.stages` for the demo; paper scale trains them one at a time):
  infty_diff         the denoiser (sparse neural operator + inner grid UNet) and, as a
                     diffusion autoencoder, its encoder, on N^2 / rate random pixels of
                     every image; mollified DDPM, cosine schedule, T = 1000
  infty_diff_latent  DiffAE latent DDPM (MLP-skip net) over the encoder's z of a finished
                     infty_diff run; provides the run's sampler: z first, then mollified
                     DDIM at any resolution

Presets (comma-separated after the colon):
  configs/infty_diff.py               infty_diff at paper scale (FFHQ 256, rate 4)
  configs/infty_diff.py:latent        infty_diff_latent at paper scale; set
                                      infty_diff_latent.stage1_workdir
  configs/infty_diff.py:demo          tiny unconditional model on the built-in shapes, 2-core CPU
  configs/infty_diff.py:demo,z=64     the diffusion autoencoder: both stages in one command
  configs/infty_diff.py:demo,rate=8   another subsampling rate (paper: 1, 2, 4, 8)
"""

import ml_collections

from infdiff import config_lib
from infdiff.data.pipeline import default_data_config

PRESETS = dict(
    demo=False,  # tiny sizes for a 2-core CPU, both stages in one command
    latent=False,  # train the latent stage only (paper scale runs the stages separately)
    rate=0.0,  # subsampling rate N^2 / points; 0 = 4 (the paper's default)
    z=-1,  # autoencoder latent width; 0 = unconditional; -1 = paper 1024 / demo 0
)


def main_config(p) -> ml_collections.ConfigDict:
  """`infty_diff` (METHODS.md: ∞-Diff; paper App. A)."""
  demo = p.demo
  c = ml_collections.ConfigDict()
  c.dtype = "float32"
  c.image_size = 32 if demo else 256  # training resolution N
  # Points per image N^2 / rate, uniform without replacement, a new subset per image.
  c.rate = float(p.rate or 4.0)
  # The demo's 2-core CPU gets more images per second at 16 than at 8 (5.7 vs 9.5 steps/s).
  c.batch_size = 16 if demo else 32  # paper: 32
  c.mollifier = ml_collections.ConfigDict(dict(sigma=1.0))  # Gaussian blur std in pixels
  # Diffusion-autoencoder latent width (paper: 1024). The demo trains the unconditional
  # model (z=0): in a 3000-step CPU run with z 64 the encoder collapsed (z's std across
  # images 5e-4 against |z| ~ 0.4), so the denoiser ignored z and the latent stage modelled
  # noise; configs/infty_diff.py:demo,z=64 runs both stages (README: ∞-Diff on the demo).
  c.z_dim = (0 if demo else 1024) if p.z < 0 else int(p.z)
  c.net = ml_collections.ConfigDict(
      dict(
          nf=32 if demo else 64,  # point-level width (paper: 64)
          num_blocks=2 if demo else 3,  # sparse blocks down and up (paper: 3)
          kernel_size=7,  # depthwise kernel at N (paper: 7; the demo's 5 gave SWD 81 vs 68)
          grid_size=16 if demo else 128,  # inner grid side (paper: 128 for 256 data)
          grid_channels=32 if demo else 128,  # features on the inner grid (paper: 128)
          knn=3,  # nearest points per grid node (inverse-squared-distance)
          sparse_conv_impl="xla",  # sparse depthwise conv: 'xla' | 'pallas' (GPU kernels)
          # Sampling on the full grid uses the subset-trained kernels' mean at `rate`
          # (models/sparse_unet.py); False runs the raw kernels, as the paper does. On the
          # demo this halves the full-grid v error at mid noise (README: ∞-Diff).
          density_match=True,
          unet=ml_collections.ConfigDict(
              dict(
                  ch=32 if demo else 128,  # paper: 128
                  channel_mult=(1, 2, 4) if demo else (1, 2, 4, 8, 8),
                  num_res_blocks=1 if demo else 2,
                  attention_resolutions=(8, 4) if demo else (16, 8),  # grid sides
                  head_channels=0,  # 0: 4 heads (choice; the paper does not say)
                  dropout=0.1,
                  dropout_resolution=8 if demo else 16,  # dropout at sides <= this
              )
          ),
      )
  )
  c.diffusion = ml_collections.ConfigDict(
      dict(
          schedule="cosine",
          num_steps=1000,
          # 'eps' predicts T eps (the paper's); 'v' the mollified v = a T eps - s T x0. The
          # demo predicts v: after 2500 CPU steps (kernel 5, density-matched sampling),
          # SWD was 81 for v and 128 for eps (README: ∞-Diff on the demo).
          parameterization="v" if demo else "eps",
      )
  )
  # Adam 5e-5 (0.9, 0.99), clip 1.0 per network, EMA 0.995 every 10 steps. The demo's short
  # CPU run uses a larger rate with a cosine decay.
  c.optim = config_lib.optim_config(
      lr=1e-3 if demo else 5e-5,
      total_steps=0,
      warmup=100 if demo else 0,
      schedule="cosine" if demo else "constant",
  )
  c.optim.b2 = 0.99
  c.optim.grad_clip = 1.0
  c.optim.grad_clip_per = ("net", "encoder")
  # EMA 0.995 every 10 steps averages over ~2000 steps: the whole of the demo's run, so the
  # demo averages every step with a 500-step horizon instead.
  c.ema_decay = 0.998 if demo else 0.995
  c.ema_every = 1 if demo else 10
  c.sample = ml_collections.ConfigDict()
  c.sample.num_steps = 50 if demo else 100  # DDIM steps, eta 0 (paper: 100)
  c.sample.clip_denoised = True  # clip x0_hat to [-1, 1] at every step
  c.sample.deblur = False  # output the Wiener-deblurred image instead of T x_0
  c.sample.batch_size = 8  # samples per compiled call
  c.sample.max_size = 2048  # largest side the sample CLI accepts (full-grid sampling)
  c.sample.sizes = (32, 64, 128) if demo else (256, 512, 1024)  # final grids
  c.sample.num = 16  # images per final grid
  # z statistics written after training (read by infty_diff_latent to normalise z).
  c.stats_images = 512 if demo else 10_000
  c.stats_batch_size = 16
  return c


def latent_config(p) -> ml_collections.ConfigDict:
  """`infty_diff_latent` (DiffAE's latent DDIM: MLP-skip net, constant betas, L1)."""
  demo = p.demo
  c = ml_collections.ConfigDict()
  c.dtype = "float32"
  c.batch_size = 64 if demo else 256  # paper (DiffAE): 256
  c.stage1_workdir = ""  # finished infty_diff run; '' = the sibling workdir/infty_diff
  c.mlp = ml_collections.ConfigDict(
      dict(num_layers=10, width=256 if demo else 2048, time_dim=64)  # paper: 10 x 2048
  )
  c.diffusion = ml_collections.ConfigDict(dict(num_steps=1000, beta=0.008, loss="l1"))
  c.optim = config_lib.optim_config(
      lr=1e-3 if demo else 1e-4, total_steps=0, schedule="cosine" if demo else "constant"
  )
  c.optim.weight_decay = 0.04  # DiffAE latent: AdamW wd 0.04 (choice for the demo too)
  c.optim.grad_clip = 1.0
  c.ema_decay = 0.999 if demo else 0.9999
  c.sample = ml_collections.ConfigDict(dict(num_steps=50 if demo else 100))  # latent DDIM
  return c


def get_config(arg=None):
  p = config_lib.parse_arg(arg, PRESETS)
  c = config_lib.base_config()
  c.stages = ("infty_diff_latent",) if p.latent else ("infty_diff",)
  c.data = default_data_config()
  c.data.source = "shapes" if p.demo else "folder:/path/to/ffhq"  # see README: data sources
  c.infty_diff = main_config(p)
  c.infty_diff_latent = latent_config(p)
  c.total_steps = 130_000 if p.latent else 500_000  # steps of the stage being trained
  c.checkpoint_every = 5000
  c.log_every = 100
  c.infty_diff_latent.optim.decay_steps = c.get_ref("total_steps")
  if p.demo:
    c.infty_diff.total_steps = 2500  # the main stage of the demo (latent: total_steps)
    c.infty_diff.optim.decay_steps = c.infty_diff.get_ref("total_steps")
    c.stages = ("infty_diff", "infty_diff_latent") if c.infty_diff.z_dim else ("infty_diff",)
    c.data.shapes_size = c.infty_diff.get_ref("image_size")
    c.total_steps = 1000
    c.checkpoint_every = 500
    c.log_every = 50
    c.mesh = (-1, 1, 1)
  else:
    c.infty_diff.optim.decay_steps = c.get_ref("total_steps")
  return c

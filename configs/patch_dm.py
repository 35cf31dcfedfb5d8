"""Patch-DM: patch diffusion with feature collage (papers/patch_dm.txt; METHODS.md: Patch-DM).

Stages:
  patch_dm        the patch UNet and the per-image semantic codes, trained with feature
                  collage on 2 x 2 blocks of half-patch-padded images; eps, linear betas
  patch_dm_codes  DiffAE MLP-skip latent DDPM over the learned codes; provides the run's
                  sampler: a code first, then patch-wise DDIM at any size

Presets (comma-separated after the colon):
  configs/patch_dm.py             patch_dm at paper scale (1024 x 512 nature images, patch 64)
  configs/patch_dm.py:codes       patch_dm_codes at paper scale; set
                                  patch_dm_codes.stage1_workdir
  configs/patch_dm.py:demo        both stages on the built-in shapes, 2-core CPU
  configs/patch_dm.py:demo,encoder=True   the jointly trained image encoder for the codes
  configs/patch_dm.py:clip_init=DIR       codes initialised from CLIP image embeddings
"""

import ml_collections

from infdiff import config_lib
from infdiff.data.pipeline import default_data_config

PRESETS = dict(
    demo=False,  # tiny sizes for a 2-core CPU, both stages in one command
    codes=False,  # train the code model only (paper scale runs the stages separately)
    encoder=False,  # codes from a jointly trained encoder instead of a per-image table
    clip_init="",  # local CLIP directory: initialise the code table from image embeddings
)


def main_config(p) -> ml_collections.ConfigDict:
  demo = p.demo
  c = ml_collections.ConfigDict()
  c.dtype = "float32"
  c.image_height = 64 if demo else 512  # training images are resized to this
  c.image_width = 64 if demo else 1024
  c.patch = 16 if demo else 64  # patch side p (paper: 64; 16 x 8 patches per image)
  c.batch_size = 8 if demo else 32  # images per step (each gives 4 + 1 patch decodes)
  c.pos_dim = 64 if demo else 128  # sin-cos features of the patch centre (row | col)
  c.unet = ml_collections.ConfigDict(
      dict(
          ch=32 if demo else 64,  # paper (Table 5): 64
          channel_mult=(1, 2, 4) if demo else (1, 2, 4, 8),
          num_res_blocks=1 if demo else 2,
          attention_resolutions=(4,) if demo else (16,),  # feature sides, + the middle
          num_heads=1,
          resblock_updown=True,  # BigGAN-style resampling ResBlocks (DiffAE's UNet)
          norm_groups=16 if demo else 32,
          dropout=0.0 if demo else 0.1,
      )
  )
  c.code = ml_collections.ConfigDict(
      dict(
          dim=64 if demo else 512,  # semantic code width (paper: 512, CLIP ViT-B/16)
          source="encoder" if p.encoder else "table",  # per-image table | joint encoder
          num=0,  # table rows; 0 = the training source's size
          init_std=0.02,  # random init of the table without clip_init
          clip_init=p.clip_init,  # local CLIP directory for the table's initial values
      )
  )
  # Classifier-free guidance on the code (drop 0.1) and the position (drop 0.5). On by
  # default: the null position is also what patches outside the training frame get
  # (positions='extend').
  c.cfg = ml_collections.ConfigDict(dict(enabled=True, drop_code=0.1, drop_pos=0.5))
  c.diffusion = ml_collections.ConfigDict(
      dict(
          num_steps=1000,
          beta_start=1e-4,
          beta_end=0.02,
          # The paper predicts eps. The demo predicts v: after 2500 CPU steps the eps model
          # left whole patches of unremoved noise speckle in its samples (its one-step eps
          # error was small and even across patches, but x0 = (x_t - s eps) / a amplifies
          # it 156x at t = 999); a 2000-step v model gives clean patches (README).
          parameterization="v" if demo else "eps",
      )
  )
  c.optim = config_lib.optim_config(
      lr=1e-3 if demo else 1e-4,
      total_steps=0,
      warmup=100 if demo else 0,
      schedule="cosine" if demo else "constant",
  )
  c.optim.grad_clip = 1.0
  c.ema_decay = 0.998 if demo else 0.9999
  c.sample = ml_collections.ConfigDict()
  c.sample.num_steps = 50  # DDIM steps, eta 0 (paper: 50)
  c.sample.batch_size = 8  # canvases per compiled call
  c.sample.patch_batch = 64  # patches per UNet call inside a step (memory bound)
  c.sample.collage = "feature"  # 'feature' (Patch-DM) | 'none' | 'shift' (ablations)
  c.sample.positions = "stretch"  # 'stretch' (2x = interpolated) | 'extend' (beyond border)
  c.sample.guidance_scale = 1.0  # CFG scale on code + position; 1 = conditional only
  c.sample.max_size = 4096
  c.sample.sizes = ((64, 64), (128, 64), (128, 128)) if demo else ((1024, 512), (2048, 1024))
  c.sample.num = 8 if demo else 16  # images per final grid
  return c


def codes_config(p) -> ml_collections.ConfigDict:
  demo = p.demo
  c = ml_collections.ConfigDict()
  c.dtype = "float32"
  # Codes per step: rows of the table (code.source='table'), else the encoder's codes of
  # `batch_size` loaded images. The loader runs either way (the table needs no images,
  # so the demo keeps its image batch small: rendering 64 scenes a step would dominate).
  c.codes_per_step = 64 if demo else 256  # paper (DiffAE latent): 256
  c.batch_size = 8 if demo else 256
  c.stage1_workdir = ""  # finished patch_dm run; '' = the sibling workdir/patch_dm
  c.mlp = ml_collections.ConfigDict(
      dict(num_layers=10, width=256 if demo else 2048, time_dim=64)  # paper: 10 x 2048
  )
  c.diffusion = ml_collections.ConfigDict(dict(num_steps=1000, beta=0.008, loss="l1"))
  c.optim = config_lib.optim_config(
      lr=1e-3 if demo else 1e-4, total_steps=0, schedule="cosine" if demo else "constant"
  )
  c.optim.grad_clip = 1.0
  c.ema_decay = 0.999 if demo else 0.9999
  c.sample = ml_collections.ConfigDict(dict(num_steps=50))  # code DDIM (paper: 50)
  return c


def get_config(arg=None):
  p = config_lib.parse_arg(arg, PRESETS)
  c = config_lib.base_config()
  c.stages = ("patch_dm_codes",) if p.codes else ("patch_dm",)
  c.data = default_data_config()
  c.data.source = "shapes" if p.demo else "folder:/path/to/nature_1024x512"  # README: data
  c.patch_dm = main_config(p)
  c.patch_dm_codes = codes_config(p)
  c.total_steps = 100_000 if p.codes else 500_000
  c.checkpoint_every = 5000
  c.log_every = 100
  c.patch_dm_codes.optim.decay_steps = c.get_ref("total_steps")
  if p.demo:
    c.stages = ("patch_dm", "patch_dm_codes")
    c.patch_dm.total_steps = 1800  # 3.5 steps/s on the 2-core CPU
    c.patch_dm.optim.decay_steps = c.patch_dm.get_ref("total_steps")
    c.data.shapes_size = 64
    # A finite training set, so every image's code is seen often (~56 times in 1800
    # steps of 8); the code model then learns 256 points.
    c.data.source_kwargs.num_scenes = 256
    c.total_steps = 500  # the code stage
    c.checkpoint_every = 500
    c.log_every = 50
    c.mesh = (-1, 1, 1)
  else:
    c.patch_dm.optim.decay_steps = c.get_ref("total_steps")
  return c

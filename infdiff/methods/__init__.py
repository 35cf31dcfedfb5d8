"""Training methods: one module per method or stage, each exposing `Method`.

A run names its stages in `config.stages`; the trainer imports
`infdiff.methods.<name>` and instantiates its `Method` (big_vision-style registry by
module name, so adding a method never touches the trainer).
"""

import importlib


def get_method_class(name: str):
  """The `Method` class of `infdiff.methods.<name>`; a one-line error if unknown."""
  try:
    module = importlib.import_module(f"infdiff.methods.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"infdiff.methods.{name}":
      raise
    raise ValueError(f"unknown method/stage {name!r}: no module infdiff.methods.{name}") from None
  return module.Method

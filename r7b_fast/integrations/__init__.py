"""Drop-in integrations of r7b_fast's kernel path into other training libraries.

- `r7b_fast.integrations.trl`: `SFTTrainer` and `DPOTrainer`, subclasses of TRL's that take
  TRL's own configs and datasets and train on packed rows with our varlen attention and fused
  linear log-prob head (change one import).

Submodules import their library lazily: importing this package needs none of them.
"""

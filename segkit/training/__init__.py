"""Training: segmenters and denoisers trained from a recipe (`segkit train`), and the recipe a data
folder's fingerprint suggests (`segkit init`).

One job per module:

- `datasets`: example sets, a recipe's `data` section as whole labelled images per split;
- `patches`: training patches cut from them, augmented, and the patch stream;
- `targets`: labels to class targets and loss weights, one rule per label kind;
- `augment_device`: the same augmentation on whole batches on the training device;
- `corruption`: synthetic noise for training and measuring denoisers;
- `losses`: weighted cross-entropy and soft Dice;
- `runs`: what every run shares: its files, the epoch runner, schedule, weight average, logs;
- `validation`: validation for every label kind and the choice of inference settings;
- `loop`: the training of segmenters; `denoise_loop`: of denoisers;
- `fingerprint`, `init`: a data folder's fingerprint, and the recipe written from it.

Nothing is imported here: the modules need torch, which `import segkit` does not load.
"""

__all__ = ["augment_device", "corruption", "datasets", "denoise_loop", "fingerprint", "init", "loop", "losses",
           "patches", "runs", "targets", "validation"]

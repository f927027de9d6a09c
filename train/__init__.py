"""Train one sub-network per sub-dataset (`cli.py train`) and evaluate their ensemble (`cli.py ensemble-eval`).

Shared by both backends (no framework code):
  ``cli`` (the command: options, recipe, backend registry) · ``config`` (recipe schema, YAML, overrides)
  · ``run`` (the job, run.json, run-folder state and atomic files) · ``epochs`` (the epoch loop, logs,
  last/best/final) · ``prepared`` (what is read of a prepared dataset: its card, shard URIs and digests,
  all through ``subspectral.schemas``) · ``stream`` (numpy batches: shard partition, shuffle, augment)
  · ``shards`` (tar bytes -> samples -> arrays) · ``storage`` (local / s3 reads) · ``schedule`` (lr per step)
  · ``mixing`` (mixup / cutmix) · ``ebv`` (Equiangular Basis Vectors) · ``portable`` (final.safetensors:
  torchvision's names) · ``progress`` (bar) · ``stopping`` (SIGTERM requests).
The torch backend: ``trainer`` (one member) · ``engine`` (train_one_epoch / evaluate) · ``models``
  (registry, stems, heads, input normalisation) · ``data`` (DataLoader over ``stream``) · ``checkpoint``
  (.pt files, the trained model) · ``distributed`` (torchrun).
``mindspore/``: the MindSpore backend (``--backend mindspore``).
``ensemble/``: `cli.py ensemble-eval` — members (discovery, loaders), lockstep (aligned val streams),
  fusion (rules), report, cli.
"""

"""PyTorch trainer for one sub-network per sub-dataset (`cli.py train`).

``config`` (recipe schema, YAML, overrides), ``models`` (registry, stems, heads, input
normalisation), ``ebv`` (Equiangular Basis Vectors), ``storage`` (local / s3 reads), ``shards``
(tar bytes -> samples -> arrays), ``data`` (partitioned, shuffled, augmented batches), ``engine``
(train_one_epoch / evaluate), ``checkpoint`` (run folder, atomic files, member loading),
``distributed`` (torchrun), ``progress`` (bar), ``trainer`` (one member), ``train_cli`` (command line).
"""

"""Corpus → N aligned WebDataset sub-datasets (`cli.py prepare`).

Pure array code: ``decompose`` (polyphase split, DCT), ``resize``, ``decode``, ``encode``.
I/O: ``storage`` (local / s3 paths), ``listing`` (sources → input table), ``reader`` (input bytes),
``tarwriter`` (shards). Planning: ``plan`` (classes, keys, splits, shards). Work: ``shard`` (one
shard of all N sub-datasets). Scheduling only: ``distributor`` (serial or Ray). Orchestration:
``prepare``; command line: ``prepare_cli``.
"""

"""`cli.py ensemble-eval`: the trained members on the aligned val sub-datasets, fused per image.

``members`` (finished runs: discovery, compatibility checks, one loader per backend) · ``lockstep``
(the N val streams read side by side, alignment checked) · ``fusion`` (mean-logits, mean-probs, geo,
vote; the accuracy-vs-members curve; pure tensor code) · ``report`` (report.json/md, the plot,
predictions.parquet) · ``cli`` (the command). See docs/ensemble.md.
"""

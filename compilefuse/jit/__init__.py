"""The ``bnfuse`` torch.compile backend: each graph Dynamo hands it folded, compiled by Inductor,
kept fresh and shared (``backend`` is the entry point)."""

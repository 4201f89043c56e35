"""`selective-attention reproduce`: the seeds' experiments end to end (`pipeline`) and their report (`report`)."""

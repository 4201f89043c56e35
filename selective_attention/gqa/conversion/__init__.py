"""The pieces of `selective_attention.gqa.convert`, in the order a conversion uses them.

- `source`: load the model to convert, refuse unsupported families and incomplete checkpoints, read its KV layout;
- `plan`: parse the requested KV heads per layer, check them, plan each layer (keep, duplicate, merge);
- `calibration`: token ids and Gram matrices of key/value activations, for the layers that merge;
- `grouping`: which KV heads to merge (contiguous mean pooling, or the least-error grouping);
- `surgery`: copy or merge whole heads of `k_proj`/`v_proj` into a `selective_llama` model.
"""

"""Spreading work over devices and processes: where a model's weights go (`placement`: accelerate's device_map,
max_memory, offload folder) and trial grids sharded over processes (`sharding`: `accelerate launch`)."""

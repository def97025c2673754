"""Benchmarks that ship with the library (`unweight bench`): a whole Llama decode step compressed
against bf16, the MLP-stack micro-benchmark, device footprint and bundle size.

| module | what |
|---|---|
| `synthetic`, `transcode` | weights drawn on the device; bf16 -> palette form on the device |
| `models` | the bf16 and the compressed model, side by side (or tensor-parallel) |
| `decode_step`, `allreduce` | the timed decode step over a filled KV cache; the collectives alone |
| `mlp_stack` | the MLP stack micro-benchmark (also behind `benchmarks/mlp_stack.py`) |
| `footprint` | device memory held and the bundle's size on disk |
| `run`, `report`, `plots`, `run_info` | the whole command; its JSON, markdown and PNG |
"""

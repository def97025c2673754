"""The benchmark scripts' `run_info`: the package's own (`unweight_jax.bench.run_info`), so that
`unweight bench` and the scripts record their runs one way."""

from unweight_jax.bench.run_info import device_tag, git_commit, gpu_driver, run_info

__all__ = ["device_tag", "git_commit", "gpu_driver", "run_info"]

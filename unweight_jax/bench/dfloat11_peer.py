"""The DFloat11 peer (issue 8 item 5): DFloat11's own Huffman decode kernel, then a bf16 matmul in
PyTorch, on the same MLP stack as `unweight_jax.bench.mlp_stack`, as DFloat11 serves a model.

DFloat11 (the `dfloat11` package: PyTorch, CuPy, `dahuffman`) codes one transformer block's weights
as one stream and, before the block runs, decodes the whole stream with one kernel launch into a
reused bf16 buffer. Here a block is one MLP layer (gate, up, down). Its encoder is a Python loop
over every weight (hours for 8B shapes), so this module encodes the same bit stream with PyTorch
on the device; the code tables, the lookup tables and the kernel are the package's own, and the
decoded first layer is checked bit for bit against the original weights.

Runs in its own process (`python -m unweight_jax.bench.dfloat11_peer ...`), before JAX takes the
GPU, and prints one JSON object: the rows, or why the peer could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import statistics
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from types import ModuleType
from typing import Any

BYTES_PER_THREAD = 8  # dfloat11.dfloat11's launch constants
THREADS_PER_BLOCK = 512
CLIP = 4.0  # as the MLP stack's step
STD = 0.02
TIMEOUT_S = 300


def _package_dir() -> Path | None:
    spec = importlib.util.find_spec("dfloat11")  # finds the package without running its __init__
    return None if spec is None or not spec.submodule_search_locations else Path(spec.submodule_search_locations[0])


def _utils() -> ModuleType:
    """`dfloat11.dfloat11_utils` (code tables, lookup tables), loaded from its file: the package's
    __init__ imports its model loader too, which needs pkg_resources, accelerate and the Hub
    client, none of them needed to decode."""
    spec = importlib.util.spec_from_file_location("dfloat11_utils", _package_dir() / "dfloat11_utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unavailable() -> str | None:
    """Why the peer cannot run here, or None."""
    if _package_dir() is None:
        return "the dfloat11 package is not installed"
    try:
        import cupy  # noqa: F401  (the kernel's launcher)
        import torch

        _utils()
    except ImportError as e:
        return f"{e.name or e} is not installed (dfloat11 decodes with torch, cupy and dahuffman)"
    if not torch.cuda.is_available():
        return "no CUDA device for PyTorch"
    return None


def encode(e: Any, table: dict) -> tuple[Any, Any, Any]:
    """DFloat11's bit stream for the exponent bytes `e` (a uint8 torch tensor), as
    `dfloat11_utils.encode` builds it one weight at a time: the codes back to back, MSB first, the
    last byte completed with the end-of-stream code; per thread of 8 bytes, the 5-bit gap to its
    first code; per block of 512 threads, the index of its first weight. Returns (encoded u8,
    packed gaps u8, output positions u32 as int64), on e's device."""
    import torch

    dev = e.device
    lengths = torch.zeros(256, dtype=torch.int64, device=dev)
    values = torch.zeros(256, dtype=torch.int64, device=dev)
    eof = None
    for symbol, (bits, value) in table.items():
        if isinstance(symbol, int):
            lengths[symbol], values[symbol] = bits, value
        else:
            eof = (bits, value)
    length = lengths[e.long()]
    value = values[e.long()]
    starts = torch.cumsum(length, 0) - length
    total = int(starts[-1] + length[-1])
    n_bytes = -(-total // 8)
    if total % 8:  # the end-of-stream code fills the last byte
        length = torch.cat([length, torch.tensor([eof[0]], device=dev)])
        value = torch.cat([value, torch.tensor([eof[1]], device=dev)])
        starts = torch.cat([starts, torch.tensor([total], device=dev)])

    # Each code (<= 32 bits) lands in at most two big-endian 32-bit words; codes never share a
    # bit, so adding them up is OR-ing them.
    words = torch.zeros(-(-(total + 64) // 32), dtype=torch.int64, device=dev)
    word, offset = starts // 32, starts % 32
    shift = 32 - offset - length
    high = torch.where(shift >= 0, value << shift.clamp(min=0), value >> (-shift).clamp(min=0))
    low = torch.where(shift < 0, (value << (32 + shift).clamp(min=0, max=31)) & 0xFFFFFFFF, 0)
    words.index_put_((word,), high, accumulate=True)
    words.index_put_((word + 1,), low, accumulate=True)
    byte_shifts = torch.tensor([24, 16, 8, 0], device=dev)
    encoded = ((words[:, None] >> byte_shifts) & 0xFF).reshape(-1)[:n_bytes].to(torch.uint8)

    thread_bits = 8 * BYTES_PER_THREAD
    windows = torch.arange(int(starts[-1]) // thread_bits + 1, device=dev) * thread_bits
    gaps = starts[torch.searchsorted(starts, windows)] - windows
    blocks = -(-n_bytes // (THREADS_PER_BLOCK * BYTES_PER_THREAD))
    gaps = torch.cat([gaps, torch.zeros(THREADS_PER_BLOCK * blocks - len(gaps), dtype=torch.int64, device=dev)])
    gap_bits = (gaps[:, None] >> torch.arange(4, -1, -1, device=dev)) & 1
    packed = _pack_bits(gap_bits.reshape(-1))

    block_bits = thread_bits * THREADS_PER_BLOCK
    firsts = torch.searchsorted(starts, torch.arange(int(starts[-1]) // block_bits + 1, device=dev) * block_bits)
    positions = torch.cat([firsts, torch.tensor([len(e)], device=dev)])
    return encoded, packed, positions


def _pack_bits(bits: Any) -> Any:
    """numpy.packbits for a 0/1 torch tensor: MSB first, the last byte zero-padded."""
    import torch

    padded = torch.cat([bits, torch.zeros(-len(bits) % 8, dtype=bits.dtype, device=bits.device)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], device=bits.device)
    return (padded.reshape(-1, 8) * weights).sum(1).to(torch.uint8)


class Block:
    """One DFloat11-coded block: gate, up and down of an MLP layer as one stream."""

    def __init__(self, weights: list[Any]):
        import torch

        utils = _utils()
        self.shapes = [tuple(w.shape) for w in weights]
        flat = torch.cat([w.reshape(-1) for w in weights])
        bits = flat.view(torch.int16)
        exponents = ((bits >> 7) & 0xFF).to(torch.uint8)
        with contextlib.redirect_stdout(io.StringIO()):  # its helpers print their tables
            _, counter = utils.get_codec(flat)
            _, _, table = utils.get_32bit_codec(counter)
            self.luts = utils.get_luts(table).to(flat.device)
        self.encoded, self.gaps, positions = encode(exponents, table)
        self.sign_mantissa = (((bits >> 8) & 0x80) | (bits & 0x7F)).to(torch.uint8)
        self.positions = positions.to(torch.int32)  # the kernel reads uint32
        self.n_elements = flat.numel()
        self.shared_mem = THREADS_PER_BLOCK * 4 + 4 + int((positions[1:] - positions[:-1]).max()) * 2
        self.grid = math.ceil(self.encoded.numel() / (THREADS_PER_BLOCK * BYTES_PER_THREAD))

    @property
    def nbytes(self) -> int:
        parts = (self.luts, self.encoded, self.gaps, self.sign_mantissa, self.positions)
        return sum(p.numel() * p.element_size() for p in parts)

    def decode(self, kernel: Any, out: Any) -> list[Any]:
        """Decodes the block into `out` (bf16, at least n_elements) and returns its matrices."""
        import torch

        kernel(
            (self.grid,), (THREADS_PER_BLOCK,),
            (self.luts.data_ptr(), self.encoded.data_ptr(), self.sign_mantissa.data_ptr(), self.positions.data_ptr(),
             self.gaps.data_ptr(), out.data_ptr(), self.luts.shape[0], self.encoded.numel(), self.n_elements),
            shared_mem=self.shared_mem,
        )
        sizes = [math.prod(s) for s in self.shapes]
        return [m.view(s) for m, s in zip(torch.split(out[: self.n_elements], sizes), self.shapes)]


def _kernel() -> Any:
    import cupy

    return cupy.RawModule(path=str(_package_dir() / "decode.ptx")).get_function("decode")


def _step(x: Any, layers: list[Any], decode) -> Any:
    import torch

    for layer in layers:
        gate, up, down = decode(layer)
        h = torch.clamp(torch.nn.functional.silu(x @ gate.T) * (x @ up.T), -CLIP, CLIP)
        x = h @ down.T
    return x


def _step_ms(run, x: Any, *, steps: int, reps: int) -> float:
    import torch

    run(x)  # warm-up
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            run(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times) / steps


def measure(layers: int, hidden: int, inter: int, batches: list[int], *, steps: int, reps: int, seed: int) -> dict:
    import torch

    kernel = _kernel()
    generator = torch.Generator(device="cuda").manual_seed(seed)
    shapes = ((inter, hidden), (inter, hidden), (hidden, inter))
    plain, coded = [], []
    for _ in range(layers):
        weights = [(torch.randn(s, generator=generator, device="cuda") * STD).to(torch.bfloat16) for s in shapes]
        plain.append(weights)
        coded.append(Block(weights))
    buffer = torch.empty(max(b.n_elements for b in coded), dtype=torch.bfloat16, device="cuda")
    exact = all(torch.equal(a.view(torch.int16), b.view(torch.int16))
                for a, b in zip(plain[0], coded[0].decode(kernel, buffer)))
    rows = []
    for batch in batches:
        x = (torch.randn((batch, hidden), generator=generator, device="cuda")).to(torch.bfloat16)
        with torch.inference_mode():
            df11 = _step_ms(lambda x: _step(x, coded, lambda b: b.decode(kernel, buffer)), x, steps=steps, reps=reps)
            bf16 = _step_ms(lambda x: _step(x, plain, lambda w: w), x, steps=steps, reps=reps)
        rows.append({"batch": batch, "dfloat11_ms": round(df11, 4), "torch_bf16_ms": round(bf16, 4)})
        print(f"DFloat11 batch {batch}: {df11:.3f} ms (torch bf16 {bf16:.3f} ms)", file=sys.stderr, flush=True)
    bf16_bytes = sum(w.numel() * 2 for layer in plain for w in layer)
    return {
        "package": f"dfloat11 {version('dfloat11')}, torch {torch.__version__}",
        "exact": exact,
        "dfloat11_bytes": sum(b.nbytes for b in coded),
        "bf16_bytes": bf16_bytes,
        "timing": f"CUDA events around {steps} steps, median of {reps}, after a warm-up step",
        "rows": rows,
    }


def run(config: Any, batches: list[int], *, steps: int, reps: int, seed: int) -> dict:
    """Runs the peer on the MLP stack of a LlamaConfig in a child process; its result, or
    {"unavailable" | "failed": why}. Call it before JAX takes the GPU's memory."""
    if _package_dir() is None:
        return {"unavailable": "the dfloat11 package is not installed"}
    command = [sys.executable, "-m", __name__, "--layers", str(config.n_layers), "--hidden", str(config.dim),
               "--inter", str(config.hidden_dim), "--batches", ",".join(map(str, batches)), "--steps", str(steps),
               "--reps", str(reps), "--seed", str(seed)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"failed": f"did not finish in {TIMEOUT_S} s"}
    print(done.stderr[-2000:], end="", file=sys.stderr, flush=True)
    if done.returncode != 0:
        return {"failed": f"exit status {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--hidden", type=int, required=True)
    parser.add_argument("--inter", type=int, required=True)
    parser.add_argument("--batches", required=True, help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    reason = unavailable()
    if reason:
        print(json.dumps({"unavailable": reason}))
        return
    batches = [int(b) for b in args.batches.split(",")]
    result = measure(args.layers, args.hidden, args.inter, batches, steps=args.steps, reps=args.reps, seed=args.seed)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

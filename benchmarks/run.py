"""Benchmark converted B-cos models beside their original Hugging Face models, in one process.

    python -m benchmarks.run                      # the four full-size models, CPU (+ CUDA when present)
    python -m benchmarks.run --quick              # tiny models, a few iterations (what the tests run)
    python -m benchmarks.run --devices cuda --dtypes bf16 --out outputs/benchmarks
    python -m benchmarks.run --devices cuda --dtypes bf16 --compile   # both models under torch.compile
    bash benchmarks/gpu_check.sh                 # docs/performance.md's GPU table, eager and compiled (one GPU)

For every model, device and dtype (bf16 = autocast with float32 weights) the original and its B-cos twin
run alternately, pair after pair, and each figure is the median over the pairs of the B-cos/original
ratio (with the median times beside it):

- forward: inference forward of a batch;
- train: forward + backward + AdamW step;
- explain: forward + backward to the input for each image's top output, in explanation mode for B-cos and
  plain input x gradient for the original;
- saved bytes: activations autograd saves for backward during one training forward, summed over distinct
  storages (``torch.autograd.graph.saved_tensors_hooks``), parameters excluded: deterministic and the same
  on every device;
- peak memory (CUDA): the most memory a training step allocates above what was allocated before it, plus
  the model's own parameters and optimiser state;
- conversion: wall time of ``bcos_hf.convert.convert`` on the in-memory original (CPU).

With ``--compile`` both models run under ``torch.compile(fullgraph=True, dynamic=False)`` (the warm-up pairs
include the compilations: one graph per step kind); saved bytes are then not measured (AOTAutograd decides
what a compiled graph saves; the eager run reports them).

Writes ``results.json`` and ``results.md`` to ``--out`` and prints the markdown table last.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import nn

import bcos_hf
from bcos_hf.convert import convert
from bcos_hf.modeling import bcos_kernels

from .models import FULL_SIZE, TINY, ModelSpec, build_original

TARGETS = {
    ("any", "any", "saved_bytes"): 1.15,
    ("cpu", "fp32", "train"): 1.2,
    ("cpu", "bf16", "train"): 1.3,
    ("cuda", "bf16", "forward"): 1.10,
    ("cuda", "bf16", "train"): 1.15,
    ("cuda", "bf16", "explain"): 1.25,
    ("cuda", "bf16", "peak_memory"): 1.2,
}
"""Upper bounds on the B-cos/original ratio, by (device, dtype, figure); "any" matches every device/dtype."""

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Settings:
    batch: int
    warmup: int
    iterations: int


def primary_output(outputs) -> torch.Tensor:
    """What a model predicts: logits for classifiers, the pooled embedding for backbones."""
    for name in ("logits", "image_embeds", "pooler_output"):
        value = getattr(outputs, name, None)
        if value is not None:
            return value.flatten(1)
    return outputs.last_hidden_state.flatten(1)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(step: Callable[[], None], device: torch.device) -> float:
    """Milliseconds of one call: CUDA events on the GPU, the wall clock on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    started = time.perf_counter()
    step()
    return (time.perf_counter() - started) * 1e3


def paired_times(
    original: Callable[[], None], bcos: Callable[[], None], device: torch.device, settings: Settings
) -> dict:
    """Run the two steps alternately (order swapped every pair) and report median times and ratio."""
    for _ in range(settings.warmup):
        original()
        bcos()
    _synchronize(device)
    times_original, times_bcos = [], []
    for index in range(settings.iterations):
        if index % 2:
            times_bcos.append(_time_once(bcos, device))
            times_original.append(_time_once(original, device))
        else:
            times_original.append(_time_once(original, device))
            times_bcos.append(_time_once(bcos, device))
    ratios = [b / o for o, b in zip(times_original, times_bcos, strict=True)]
    return {
        "original_ms": statistics.median(times_original),
        "bcos_ms": statistics.median(times_bcos),
        "ratio": statistics.median(ratios),
    }


class Runner:
    """The three steps (forward, train, explain) of one model on one device and dtype."""

    def __init__(
        self, model: nn.Module, images: torch.Tensor, dtype: torch.dtype, bcos: bool, compile: dict | None = None
    ) -> None:
        """``compile``: keyword arguments of ``torch.compile`` to run the model compiled (None: eagerly)."""
        self.model, self.images, self.bcos = model, images, bcos
        self.call = model if compile is None else torch.compile(model, **compile)
        self.device = images.device
        self.autocast = dtype != torch.float32
        self.dtype = dtype
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
        self.labels = torch.zeros(images.shape[0], dtype=torch.long, device=self.device)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.autocast else nullcontext()

    def _loss(self, outputs) -> torch.Tensor:
        if getattr(outputs, "logits", None) is not None:
            return F.cross_entropy(outputs.logits.float(), self.labels)
        return primary_output(outputs).float().square().mean()

    def _mode(self, training: bool) -> None:
        """Switch train/eval only when it changes: ``Module.train`` walks every submodule, host time that
        a training or inference loop does not spend per step."""
        if self.model.training != training:
            self.model.train(training)

    def forward(self) -> None:
        self._mode(training=False)
        with torch.inference_mode(), self._autocast():
            self.call(pixel_values=self.images)

    def train_forward(self) -> torch.Tensor:
        self._mode(training=True)
        with self._autocast():
            return self._loss(self.call(pixel_values=self.images))

    def train(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.train_forward().backward()
        self.optimizer.step()

    def explain(self) -> None:
        self._mode(training=False)
        images = self.images.detach().requires_grad_(True)
        mode = bcos_hf.explanation_mode(self.model) if self.bcos else nullcontext()
        with mode, self._autocast():
            scores = primary_output(self.call(pixel_values=images)).float()
            torch.autograd.grad(scores.max(dim=1).values.sum(), images)

    def saved_bytes(self) -> int:
        """Bytes of the distinct storages autograd saves during one training forward, parameters excluded."""
        parameters = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameters:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = self.train_forward()
        del loss
        return sum(storages.values())

    def peak_memory(self) -> int:
        """Peak bytes of one training step above what was allocated before, plus own parameters and state."""
        self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.train_forward().backward()
        self.optimizer.step()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        own = sum(p.numel() * p.element_size() for p in self.model.parameters())
        for state in self.optimizer.state.values():
            own += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
        return peak + own


def _pair_figure(original: float, bcos: float) -> dict:
    return {"original": original, "bcos": bcos, "ratio": bcos / original}


def benchmark_pair(
    spec: ModelSpec,
    devices: list[torch.device],
    dtypes: list[str],
    settings: dict[str, Settings],
    compile: dict | None = None,
) -> tuple[list[dict], dict]:
    """All figures for one architecture; returns the result rows and the conversion record. ``compile``: run
    both models under ``torch.compile`` with these keyword arguments."""
    original = build_original(spec)
    started = time.perf_counter()
    conversion = convert(original, b=2.0, image_mean=spec.image_mean, image_std=spec.image_std)
    conversion_seconds = time.perf_counter() - started
    bcos = conversion.model.float()
    record = {
        "model": spec.name,
        "conversion_seconds": round(conversion_seconds, 3),
        "equivalence_max_abs_diff": conversion.report.equivalence_max_abs_diff,
    }
    rows = []
    for device in devices:
        original.to(device)
        bcos.to(device)
        run = settings[device.type]
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(run.batch, 3, spec.image_size, spec.image_size, generator=generator).to(device)
        normalised = (images - torch.tensor(spec.image_mean, device=device).view(1, 3, 1, 1)) / torch.tensor(
            spec.image_std, device=device
        ).view(1, 3, 1, 1)
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            if compile is not None:
                # Every transformers model's forward goes through one decorator frame, whose graphs dynamo counts
                # against one recompile limit (8): start each model and dtype (6 graphs) afresh.
                torch._dynamo.reset()
            plain = Runner(original, normalised, dtype, bcos=False, compile=compile)
            converted = Runner(bcos, images, dtype, bcos=True, compile=compile)
            mode = "eager" if compile is None else "compiled"
            row = {"model": spec.name, "device": device.type, "dtype": dtype_name, "mode": mode, "batch": run.batch}
            if compile is None:
                row["saved_bytes"] = _pair_figure(plain.saved_bytes(), converted.saved_bytes())
            row["forward"] = paired_times(plain.forward, converted.forward, device, run)
            row["train"] = paired_times(plain.train, converted.train, device, run)
            row["explain"] = paired_times(plain.explain, converted.explain, device, run)
            if device.type == "cuda":
                row["peak_memory"] = _pair_figure(plain.peak_memory(), converted.peak_memory())
            del plain, converted
            rows.append(row)
            print(_row_summary(row), flush=True)
        original.to("cpu")
        bcos.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, record


def _row_summary(row: dict) -> str:
    figures = ", ".join(f"{key} {row[key]['ratio']:.3f}x" for key in FIGURES if key in row)
    return f"{row['model']} {row['device']} {row['dtype']} {row['mode']} batch {row['batch']}: {figures}"


FIGURES = ("forward", "train", "explain", "saved_bytes", "peak_memory")


def check_targets(rows: list[dict]) -> list[dict]:
    """Every (row, figure) a target applies to, with the ratio, the bound and whether it is met."""
    checks = []
    for row in rows:
        for (device, dtype, figure), bound in TARGETS.items():
            if device in ("any", row["device"]) and dtype in ("any", row["dtype"]) and figure in row:
                ratio = row[figure]["ratio"]
                checks.append(
                    {
                        "model": row["model"],
                        "device": row["device"],
                        "dtype": row["dtype"],
                        "mode": row["mode"],
                        "figure": figure,
                        "ratio": round(ratio, 4),
                        "target": bound,
                        "met": ratio <= bound,
                    }
                )
    return checks


def check_fused_kernels(device: torch.device, dtypes: list[torch.dtype]) -> dict:
    """The fused CUDA kernels against their PyTorch fallback on random data: largest relative error."""
    with bcos_kernels.fusion(min_bytes=0):  # fuse these small tensors too
        return _fused_kernel_error(device, dtypes)


def _fused_kernel_error(device: torch.device, dtypes: list[torch.dtype]) -> dict:
    worst = 0.0
    for dtype in dtypes:
        for shape in ((512, 384, 1), (8, 96, 3136)):  # linear rows, conv windows
            grad, out = (torch.randn(shape, device=device, dtype=dtype) for _ in range(2))
            norm = torch.rand(shape[0], 1, shape[2], device=device) * 10 + 0.5
            y = bcos_kernels.scale2_forward(out, norm)
            cases = [
                (bcos_kernels.scale2_forward, (out, norm)),
                (bcos_kernels.scale2_backward, (grad, y, norm)),
                (bcos_kernels.scale2_backward_detached, (grad, y, norm)),
                (bcos_kernels.scale_forward, (out, norm, 2.5)),
                (bcos_kernels.scale_backward, (grad, out, norm, 2.5)),
                (bcos_kernels.scale_backward_detached, (grad, out, norm, 2.5)),
            ]
            for kernel, arguments in cases:
                fused = bcos_kernels.compiled_kernel(kernel, arguments)
                assert fused is not None, "the fused path is not taken on CUDA"
                for got, want in zip(
                    torch.utils._pytree.tree_leaves(fused(*arguments)),
                    torch.utils._pytree.tree_leaves(kernel(*arguments)),
                    strict=True,
                ):
                    error = ((got.float() - want.float()).norm() / want.float().norm()).item()
                    worst = max(worst, error)
    return {"device": torch.cuda.get_device_name(device), "max_relative_error": worst, "ok": worst < 1e-2}


def environment(devices: list[torch.device]) -> dict:
    info = {
        "python": platform.python_version(),
        "fused_cuda_kernels": bcos_kernels.FUSION.on_cuda,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bcos_hf": bcos_hf.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    if any(device.type == "cuda" for device in devices):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _format_time(figure: dict) -> str:
    return f"{figure['bcos_ms']:.1f} / {figure['original_ms']:.1f} = **{figure['ratio']:.2f}×**"


def _format_bytes(figure: dict) -> str:
    mib = 2**20
    return f"{figure['bcos'] / mib:.1f} / {figure['original'] / mib:.1f} MiB = **{figure['ratio']:.2f}×**"


def markdown(results: dict) -> str:
    """The results as a markdown table (B-cos / original, ms or MiB) followed by the targets."""
    lines = [
        f"Command: `{results['command']}`  ",
        "Environment: " + ", ".join(f"{key} {value}" for key, value in results["environment"].items()),
        "",
        "| model | device | dtype | mode | batch | forward ms | train step ms | explain ms | saved activations "
        "| peak train memory |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        peak = _format_bytes(row["peak_memory"]) if "peak_memory" in row else "–"
        saved = _format_bytes(row["saved_bytes"]) if "saved_bytes" in row else "–"
        lines.append(
            f"| {row['model']} | {row['device']} | {row['dtype']} | {row['mode']} | {row['batch']} | "
            f"{_format_time(row['forward'])} | {_format_time(row['train'])} | {_format_time(row['explain'])} | "
            f"{saved} | {peak} |"
        )
    lines += ["", "| model | conversion s | equivalence max abs diff |", "|---|---|---|"]
    for record in results["conversions"]:
        lines.append(
            f"| {record['model']} | {record['conversion_seconds']:.2f} | {record['equivalence_max_abs_diff']:.1e} |"
        )
    lines += ["", "| target | worst ratio (model) | bound | met |", "|---|---|---|---|"]
    by_target: dict[tuple, list[dict]] = {}
    for check in results["targets"]:
        by_target.setdefault((check["device"], check["dtype"], check["mode"], check["figure"]), []).append(check)
    for (device, dtype, mode, figure), checks in by_target.items():
        worst = max(checks, key=lambda check: check["ratio"])
        met = "yes" if all(check["met"] for check in checks) else f"no (gap {worst['ratio'] - worst['target']:+.2f})"
        lines.append(
            f"| {figure}, {device} {dtype} {mode} | {worst['ratio']:.2f}× ({worst['model']}) | ≤ {worst['target']} "
            f"| {met} |"
        )
    for check in results.get("fused_kernels", []):
        lines.append(
            f"- Fused CUDA kernels vs PyTorch fallback on {check['device']}: largest relative error "
            f"{check['max_relative_error']:.1e} ({'ok' if check['ok'] else 'MISMATCH'})."
        )
    lines += [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, batch 2, a few iterations")
    parser.add_argument("--devices", default=None, help="comma-separated: cpu,cuda (default: cpu, and cuda if present)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32,bf16 (bf16 = autocast)")
    parser.add_argument("--models", default=None, help="comma-separated model names to run (default: all)")
    parser.add_argument("--cpu-batch", type=int, default=2)
    parser.add_argument("--cuda-batch", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=None, help="timed pairs (default 5 on CPU, 15 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed pairs first (default 1 on CPU, 5 on CUDA)")
    parser.add_argument(
        "--cpu-threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); on a shared, busy machine 1 avoids waiting at barriers",
    )
    parser.add_argument(
        "--no-fuse", action="store_true", help="B-cos layers without fused CUDA kernels (PyTorch fallback)"
    )
    parser.add_argument(
        "--compile", action="store_true", help="run both models under torch.compile(fullgraph=True, dynamic=False)"
    )
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (with --compile)")
    parser.add_argument(
        "--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead for CUDA graphs (with --compile)"
    )
    parser.add_argument("--out", default="outputs/benchmarks", help="folder for results.json and results.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    bcos_kernels.FUSION.on_cuda = not args.no_fuse  # for the whole run, as the flag says
    if args.devices is None:
        device_names = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        device_names = args.devices.split(",")
    devices = [torch.device(name) for name in device_names]
    dtypes = args.dtypes.split(",")
    unknown = set(dtypes) - set(DTYPES)
    if unknown:
        raise SystemExit(f"Unknown dtypes {sorted(unknown)}; choose from {sorted(DTYPES)}.")
    specs = TINY if args.quick else FULL_SIZE
    if args.models:
        wanted = set(args.models.split(","))
        specs = [spec for spec in specs if spec.name in wanted]
    settings = {
        "cpu": Settings(
            batch=args.cpu_batch,
            warmup=args.warmup if args.warmup is not None else 1,
            iterations=args.iterations or (2 if args.quick else 5),
        ),
        "cuda": Settings(
            batch=2 if args.quick else args.cuda_batch,
            warmup=args.warmup if args.warmup is not None else (1 if args.quick else 5),
            iterations=args.iterations or (2 if args.quick else 15),
        ),
    }
    if args.compile:  # compilations happen in the warm-up pairs, never in the timed ones
        for run in settings.values():
            run.warmup = max(run.warmup, 1)
    results = {
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": environment(devices),
        "settings": {name: vars(value) for name, value in settings.items()},
        "rows": [],
        "conversions": [],
        "targets": [],
        "fused_kernels": [],
        "notes": [],
    }
    for device in devices:
        if device.type == "cuda" and bcos_kernels.FUSION.on_cuda:
            try:
                results["fused_kernels"].append(check_fused_kernels(device, [DTYPES[name] for name in dtypes]))
            except Exception as error:  # a broken compiler must not cost the whole run: measure unfused
                bcos_kernels.FUSION.on_cuda = False
                results["environment"]["fused_cuda_kernels"] = False
                results["notes"].append(f"Fused kernels unavailable ({error!r}); B-cos ran with the PyTorch fallback.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        if spec.model_type not in bcos_hf.ADAPTERS:
            results["notes"].append(f"{spec.name} skipped: no adapter for model_type {spec.model_type!r} yet.")
            continue
        model_rows, record = benchmark_pair(spec, devices, dtypes, settings, compile_options(args))
        results["rows"] += model_rows
        results["conversions"].append(record)
        results["targets"] = check_targets(results["rows"])
        write_results(results, out)  # after every model, so that an interrupted run keeps what it measured
    table = write_results(results, out)
    print(table)
    return results


def compile_options(args: argparse.Namespace) -> dict | None:
    """``torch.compile`` keyword arguments for ``--compile`` (None without it)."""
    if not args.compile:
        return None
    return {"fullgraph": True, "dynamic": False, "backend": args.compile_backend, "mode": args.compile_mode}


def write_results(results: dict, out: Path) -> str:
    """Write ``results.json`` and ``results.md`` to ``out``; return the markdown."""
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (out / "results.md").write_text(table)
    return table


if __name__ == "__main__":
    main()

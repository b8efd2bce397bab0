"""The ``bcos-hf`` command line: ``bcos-hf convert SRC OUT [--b B] [--keep-bias]``."""

from __future__ import annotations

import argparse
import logging
import sys

from .modeling.rewriting import UnsupportedModelError


def _add_convert(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="Convert a pretrained checkpoint (hub id or folder) into a B-cos model folder.",
        description="Convert a pretrained checkpoint into a B-cos model. `--b 1 --keep-bias` is the equivalence "
        "mode (same outputs as the source); the default (B = 2, no biases) is the model to fine-tune.",
    )
    parser.add_argument("source", help="hub id or local folder of a supported checkpoint")
    parser.add_argument("output_dir", help="folder to write the B-cos model to")
    parser.add_argument("--b", type=float, default=2.0, help="B-cos exponent, >= 1 (default: 2)")
    parser.add_argument("--keep-bias", action="store_true", help="keep the pretrained biases")
    parser.add_argument("--normalize-weights", action="store_true", help="unit-norm weights instead of raw ones")
    parser.add_argument("--logit-bias", type=float, default=None, help="default: -log(C-1) without biases, else 0")
    parser.add_argument("--logit-temperature", type=float, default=1.0, help="logits are divided by it (default 1)")
    parser.add_argument("--image-mean", type=float, nargs=3, default=None, help="override the source's mean")
    parser.add_argument("--image-std", type=float, nargs=3, default=None, help="override the source's std")
    parser.set_defaults(handler=_run_convert)


def _run_convert(args: argparse.Namespace) -> None:
    from .convert import convert

    conversion = convert(
        args.source,
        args.output_dir,
        b=args.b,
        keep_bias=args.keep_bias,
        normalize_weights=args.normalize_weights,
        logit_bias=args.logit_bias,
        logit_temperature=args.logit_temperature,
        image_mean=args.image_mean,
        image_std=args.image_std,
    )
    report = conversion.report
    print(
        f"Converted {report.source} ({report.source_architecture}) -> {report.output_dir} ({report.model_class})\n"
        f"  B = {report.b:g}, biases kept: {report.keep_bias}, logit bias: {report.logit_bias:.4g}, "
        f"parameters: {report.parameters:,}\n"
        f"  equivalence check (B = 1, biases kept vs source): max |diff| = {report.equivalence_max_abs_diff:.3g}\n"
        f"  {report.seconds:.2f} s; report: {report.output_dir}/conversion_report.json"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bcos-hf", description="B-cos models for Hugging Face transformers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_convert(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    import bcos_hf  # noqa: F401  (registers the Auto classes)

    try:
        args.handler(args)
    except (UnsupportedModelError, ValueError, OSError) as error:
        print(f"bcos-hf {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

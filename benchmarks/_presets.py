"""Preset handling shared by the benchmark scripts (imported as a sibling module: scripts run from benchmarks/)."""

from __future__ import annotations

import argparse
import sys

import torch


def apply_preset(args: argparse.Namespace, presets: dict[str, dict]) -> bool:
    """Fill every option left at None from ``presets[args.preset]``; False (with a message) if CUDA is asked but absent."""
    for key, value in presets[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: use --preset tiny-cpu", file=sys.stderr)
        return False
    return True

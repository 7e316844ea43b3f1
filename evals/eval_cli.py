"""The options of `anomaly-agent eval generators`, without importing torch (the CLI builds its parser
on every call; the evaluation itself is imported only when it runs; `evals.commands` reads them back)."""

from __future__ import annotations

from typing import Any

#: The generators of the comparison: the agent and the three baselines of `evals.baselines`.
GENERATORS = ("agent", "open_loop", "draem", "cutpaste_scar")


def add_arguments(parser: Any) -> None:
    """The options of `anomaly-agent eval generators` (kept here so the CLI stays wiring only)."""
    parser.add_argument(
        "--out", required=True, help="folder for report.md, report.json, plots, contact sheets and data/"
    )
    parser.add_argument(
        "--real", help="an MVTec-layout dataset: run the real protocol on it instead of cross-generator"
    )
    parser.add_argument("--generators", help=f"comma-separated subset of {','.join(GENERATORS)}")
    parser.add_argument(
        "--categories", help="comma-separated (default: tile,metal_nut; with --real: all in the dataset)"
    )
    parser.add_argument(
        "--types", help="comma-separated defect types for every category (default: per category)"
    )
    parser.add_argument("--size", type=int, default=128, help="image side for generation and the detectors")
    parser.add_argument(
        "--train-normals",
        dest="train_normals",
        type=int,
        default=12,
        help="normal images to draw on per category",
    )
    parser.add_argument(
        "--test-normals",
        dest="test_normals",
        type=int,
        default=9,
        help="held-out normals per category (cross-generator)",
    )
    parser.add_argument("--cls-epochs", dest="cls_epochs", type=int, default=6)
    parser.add_argument("--loc-epochs", dest="loc_epochs", type=int, default=8)
    parser.add_argument(
        "--unet-base", dest="unet_base", type=int, default=16, help="UNet channels at full resolution"
    )
    parser.add_argument(
        "--resnet-weights", dest="resnet_weights", help="torchvision-format ResNet34 state dict to start from"
    )
    parser.add_argument(
        "--inception-weights",
        dest="inception_weights",
        help="not supported yet: IS uses the EfficientNet-Lite0 stand-in",
    )
    parser.add_argument(
        "--lpips-weights",
        dest="lpips_weights",
        help="not supported yet: IC-LPIPS uses the EfficientNet-Lite0 stand-in",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bars")

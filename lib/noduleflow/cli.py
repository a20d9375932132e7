"""The `noduleflow` command. `noduleflow forecast`: forecast the nodules of a new exam with a trained run.

    noduleflow forecast --model results/models/runs/raw3d_bridge/model.pt --image exam.nii.gz \\
        --box 120 131 200 212 40 44 --days 365 730 --out forecast/
    noduleflow forecast --model model.pt --table nodules.csv --out forecast/

Conventions (boxes, centres, world millimetres) are those of noduleflow.evaluation.predict.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from noduleflow.cache.segmenter import build_segmenter
from noduleflow.evaluation.forecast import forecast_settings
from noduleflow.evaluation.predict import (
    ForecastInputError,
    ForecastJob,
    NoduleRequest,
    forecast_requests,
    load_portable_run,
    read_requests,
)
from noduleflow.models.training import ModelFileError

log = logging.getLogger("noduleflow")
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "config" / "config.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="noduleflow", description="Lung nodule follow-up forecasts.")
    commands = parser.add_subparsers(dest="command", required=True)
    forecast = commands.add_parser(
        "forecast", help="forecast nodules of a new exam",
        description="Forecast nodules of an exam with a trained run. Boxes are i0 i1 j0 j1 k0 k1 (i = row, j = "
                    "column, k = slice, inclusive) in voxels, or x0 x1 y0 y1 z0 z1 in LPS mm with --world; centres "
                    "are i j k, or x y z with --world.")
    forecast.add_argument("--model", required=True, help="the run's model.pt (a portable run)")
    forecast.add_argument("--out", required=True, help="output folder")
    forecast.add_argument("--table", help="CSV of nodules: name, image, days, box or centre, [space, diameter_mm, "
                                          "series_uid]; instead of --image")
    forecast.add_argument("--image", help="exam: NIfTI file or DICOM folder")
    forecast.add_argument("--series-uid", help="the series of a DICOM folder holding several")
    where = forecast.add_mutually_exclusive_group()
    where.add_argument("--box", nargs=6, type=float, metavar="V")
    where.add_argument("--centre", nargs=3, type=float, metavar="V")
    forecast.add_argument("--world", action="store_true", help="box or centre in LPS millimetres")
    forecast.add_argument("--diameter-mm", type=float, default=10.0, help="box edge around a centre (default 10)")
    forecast.add_argument("--days", nargs="+", type=float, help="interval(s) in days")
    forecast.add_argument("--name", default="nodule", help="the nodule's name (its output folder)")
    forecast.add_argument("--samples", type=int, default=8, help="forecasts per nodule and interval (default 8)")
    forecast.add_argument("--seed", type=int, help="sampling seed (default: the run's, as its evaluation)")
    forecast.add_argument("--steps", type=int, help="sampler steps (default: the run's)")
    forecast.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                          help="workflow config whose `segmentation` and `evaluation` settings measure the forecasts "
                               "(default: the repository's config/config.yaml)")
    return parser


def forecast(args: argparse.Namespace) -> int:
    """Run `noduleflow forecast`; 0 when every nodule was forecast, 1 when some were not."""
    if args.table is None and (args.image is None or args.days is None or (args.box is None) == (args.centre is None)):
        raise ForecastInputError("give --table, or --image, --days and one of --box and --centre")
    if args.samples < 1:
        raise ForecastInputError(f"--samples must be at least 1, not {args.samples}")
    run = load_portable_run(args.model)
    requests = read_requests(args.table) if args.table else [NoduleRequest(
        name=args.name, image=args.image, days=tuple(args.days), box=None if args.box is None else tuple(args.box),
        centre=None if args.centre is None else tuple(args.centre), world=args.world, diameter_mm=args.diameter_mm,
        series_uid=args.series_uid)]
    config = yaml.safe_load(Path(args.config).read_text())
    settings = forecast_settings(config["evaluation"], {**run.sampler, "steps": args.steps or run.sampler["steps"]},
                                 run.seed if args.seed is None else args.seed)
    job = ForecastJob(args.samples, settings, build_segmenter(config["segmentation"]))
    table = forecast_requests(run, requests, job, args.out, Path(args.out) / "forecasts.csv")
    failed = table["error"].fillna("").ne("")
    log.info("%d forecast rows, %d nodule(s) failed; table: %s/forecasts.csv", int((~failed).sum()),
             int(failed.sum()), args.out)
    return 1 if failed.any() else 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    args = _parser().parse_args(argv)
    try:
        return forecast(args)
    except (ForecastInputError, ModelFileError) as error:
        print(f"noduleflow {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

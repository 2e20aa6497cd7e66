"""Command line: a thin shell over the Python API (runs.py, detector.py, demo.py)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from collections.abc import Sequence

from . import distributed
from .backbone import BACKBONES
from .calibration import MANUAL, METHODS, describe_area
from .config import PRESETS, make_config
from .data.datasets import DATASET_KINDS
from .data.geometry import RESIZE_MODES
from .data.images import MAX_PIXELS
from .deploy import RUNTIMES, export_model, predict_run, resolve_model
from .detector import INPFormer
from .distributed import DEVICES
from .errors import InpformerError, TrainingStopped
from .files import output_file
from .quantize import INT8_METHODS
from .results import recall_table
from .runs import SETTINGS, DataSource, calibrate_run, resumable_training, test_run, train_run
from .tracking import TRACKERS

CONFIG_OPTIONS = ("backbone", "backbone_weights", "image_size", "crop_size", "resize_mode", "train_tokens",
                  "tile_scale", "tile_overlap",
                  "iterations", "epochs", "batch_size",
                  "lr", "final_lr", "warmup_iterations", "weight_decay", "grad_clip", "num_inps",
                  "coherence_weight", "seed", "feature_cache", "val_fraction", "max_false_reject",
                  "feature_cache_storage", "device", "compile", "precision")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inpformer", description="INP-Former visual anomaly detection")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train: single, multi, super-multi or few-shot setting")
    _add_data_options(train)
    train.add_argument("--categories", type=_comma_list, help="comma-separated subset of categories, e.g. a,b")
    train.add_argument("--setting", choices=SETTINGS,
                       help="single (default): a model per category; multi: one for all; super-multi: one for several "
                            "datasets; few-shot: --shots images per category, expanded x22")
    train.add_argument("--shots", type=int, metavar="K", help="few-shot: training images per category")
    train.add_argument("--repeats", type=int, metavar="N",
                       help="few-shot: N independent draws, reported as mean ± std (default 1)")
    train.add_argument("--preset", choices=sorted(PRESETS), help="the settings to start from (default cpu)")
    train.add_argument("--backbone", choices=sorted(BACKBONES))
    train.add_argument("--backbone-weights", metavar="PATH", help="local DINOv2 weights (.pth or .safetensors)")
    train.add_argument("--image-size", metavar="R|HxW",
                       help="resize images to R x R or HEIGHT x WIDTH, e.g. 448x336 (alone: no crop)")
    train.add_argument("--crop-size", metavar="C|HxW", help="centre crop C x C or HxW (multiples of 14)")
    train.add_argument("--resize-mode", choices=RESIZE_MODES,
                       help="stretch (default, the paper) or pad: keep the aspect ratio and pad by reflection "
                            "(padding never counts in maps, scores or metrics)")
    train.add_argument("--tile-scale", type=float, metavar="S",
                       help="large images: resize by S (e.g. 0.5), then cut into overlapping tiles of --image-size "
                            "(trained on the tiles of good images; maps stitched with smooth blending)")
    train.add_argument("--tile-overlap", type=float, metavar="F", help="fraction of a tile its neighbour shares "
                                                                        "(default 0.25)")
    train.add_argument("--train-tokens", type=_tokens, metavar="K|all",
                       help="decode a random K tokens per image per training step (cpu preset: 128; paper: all); "
                            "cheaper steps, the INPs still see every token")
    train.add_argument("--iterations", type=int, metavar="N", help="optimizer steps (overrides --epochs)")
    train.add_argument("--epochs", type=int, metavar="E")
    train.add_argument("--batch-size", type=int, metavar="B")
    train.add_argument("--lr", type=float, help="peak learning rate")
    train.add_argument("--final-lr", type=float, help="learning rate at the end of the cosine decay")
    train.add_argument("--warmup-iterations", type=int)
    train.add_argument("--weight-decay", type=float)
    train.add_argument("--grad-clip", type=float)
    train.add_argument("--num-inps", type=int, help="number of Intrinsic Normal Prototypes (paper: 6)")
    train.add_argument("--coherence-weight", type=float, help="INP coherence loss weight (paper: 0.2)")
    train.add_argument("--seed", type=int)
    train.add_argument("--no-feature-cache", dest="feature_cache", action="store_const", const=False,
                       help="recompute the frozen encoder at every step (slower; same result)")
    train.add_argument("--val-fraction", type=float, metavar="F",
                       help="fraction of good training images held out to calibrate the thresholds (default 0.1)")
    train.add_argument("--max-false-reject", type=float, metavar="R",
                       help="calibrated thresholds reject at most this fraction of good images (default 0.01)")
    train.add_argument("--feature-cache-storage", choices=("auto", "memory", "disk"),
                       help="where the feature cache lives (default auto: memory when it takes under a quarter of "
                            "the free RAM, else a memory-mapped file under $INPFORMER_CACHE)")
    train.add_argument("--device", choices=DEVICES, help="training device (default auto: CUDA when available)")
    train.add_argument("--devices", type=int, default=1, metavar="N",
                       help="data-parallel training processes on this machine, one per GPU (default 1); "
                            "--batch-size is the total over them. Several machines: torchrun, see docs/gpus.md")
    train.add_argument("--precision", choices=("fp32", "bf16"),
                       help="training arithmetic (default fp32, as the paper; bf16: decoder under autocast, faster on "
                            "recent GPUs and on CPUs with AVX512-BF16 or AMX, less accurate: docs/accuracy.md)")
    train.add_argument("--no-compile", dest="compile", action="store_const", const=False,
                       help="do not torch.compile the decoder (only ever compiled when training on CUDA)")
    train.add_argument("--extra-good", metavar="DIR",
                       help="more good images of the one category trained, e.g. an operator's FEEDBACK/good: fitted "
                            "on, never held out for calibration")
    run_dir = train.add_mutually_exclusive_group(required=True)
    run_dir.add_argument("--out", metavar="RUN_DIR")
    run_dir.add_argument("--resume", metavar="RUN_DIR",
                         help="go on with the training interrupted in RUN_DIR (Ctrl-C, SIGTERM, a crash) from its last "
                              "saved state, with its options (others given must equal them), to the same result")
    train.add_argument("--checkpoint-every", type=int, default=100, metavar="N",
                       help="save the training state every N optimizer steps for --resume (default 100; 0: only "
                            "when stopped by Ctrl-C or SIGTERM)")
    train.add_argument("--log", choices=TRACKERS, help="also log the loss and learning rate of every step and the "
                       "calibration to RUN_DIR/tensorboard or RUN_DIR/mlflow.db (pip install 'inpformer[NAME]'); "
                       "--resume keeps logging as before")
    train.add_argument("--quiet", action="store_true", help="no progress bars")

    test = commands.add_parser("test", help="evaluate a run: metrics table, metrics.json/csv, scores.csv")
    test.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, or a .pt checkpoint with --data")
    _add_data_options(test, required=False)
    test.add_argument("--categories", type=_comma_list, help="evaluate only these categories")
    test.add_argument("--model", metavar="NAME", help="evaluate only this model of the run (see run.json)")
    test.add_argument("--zero-shot", action="store_true",
                      help="apply the run's model to unseen data; map = distance of each token to its nearest INP")
    test.add_argument("--save-maps", action="store_true", help="also write RUN_DIR/maps.npz (maps and masks)")
    test.add_argument("--out", metavar="DIR", help="where to write the results (default: RUN_DIR, or "
                      "RUN_DIR/zero-shot with --zero-shot)")
    test.add_argument("--report", action="store_true",
                      help="also write report.html: metrics, ROC/PR curves, histograms and a gallery")
    test.add_argument("--log", choices=TRACKERS, help="also log the metrics to the run's tensorboard or mlflow logs")
    test.add_argument("--quiet", action="store_true")

    predict = commands.add_parser("predict", help="score images: decisions, maps, masks, overlays and report.html")
    predict.add_argument("model", metavar="RUN_DIR",
                         help="a run directory, a .pt checkpoint, an exported .onnx file or OpenVINO folder")
    predict.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIRS")
    predict.add_argument("--out", required=True, metavar="DIR")
    predict.add_argument("--runtime", choices=RUNTIMES, default="torch")
    predict.add_argument("--batch-size", type=int, default=8, metavar="B")
    predict.add_argument("--category", help="category of the images (multi-class models infer it otherwise)")
    predict.add_argument("--model", dest="model_name", metavar="NAME", help="which model of the run (see run.json)")
    predict.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                         help=f"refuse larger images (decompression bombs; default {MAX_PIXELS})")
    predict.add_argument("--min-defect-area", type=float, metavar="A",
                         help="instead of the model's: defect regions smaller than A (below 1: a fraction of the "
                              "image area; else pixels) do not make a part defective")
    predict.add_argument("--quiet", action="store_true")

    calibrate = commands.add_parser("calibrate", help="recompute a run's decision thresholds without retraining")
    calibrate.add_argument("run_dir", metavar="RUN_DIR",
                           help="a run directory, or a .pt checkpoint (e.g. an imported model) with --data")
    _add_data_options(calibrate, required=False)
    calibrate.add_argument("--method", choices=METHODS,
                           help="false-reject (default): from good images; f1: F1-optimal, needs defective images "
                                "with masks")
    calibrate.add_argument("--max-false-reject", type=float, metavar="R", help="false-reject rate (default: the run's)")
    calibrate.add_argument("--model", metavar="NAME", help="only this model of the run")
    calibrate.add_argument("--image-threshold", type=float, metavar="X",
                           help="set the image threshold by hand (raw score units), without images")
    calibrate.add_argument("--pixel-threshold", type=float, metavar="Y",
                           help="set the pixel threshold by hand (raw map units); default: keep it")
    calibrate.add_argument("--min-defect-area", type=float, metavar="A",
                           help="defect regions smaller than A (below 1: a fraction of the image area, e.g. 0.001; "
                                "else pixels; 0: none) do not make a part defective; alone, thresholds are kept")
    calibrate.add_argument("--category", help="set by hand only this category's values (default: every category)")
    calibrate.add_argument("--quiet", action="store_true")

    export = commands.add_parser("export", help="export a model to a self-contained ONNX file and/or OpenVINO "
                                                "folder (docs/runtimes.md)")
    export.add_argument("run_dir", metavar="RUN_DIR", help="a run directory or a .pt checkpoint")
    export.add_argument("--onnx", metavar="FILE", help="write an ONNX file (fp32, or int8 with --int8)")
    export.add_argument("--openvino", metavar="DIR", help="write an OpenVINO folder, model.xml and model.bin (fp32, "
                                                          "or int8 with --int8; needs pip install "
                                                          "'inpformer[openvino]')")
    export.add_argument("--int8", nargs="?", const="static", choices=INT8_METHODS,
                        help="quantise for faster CPU inference: static (the default) calibrates on good images and "
                             "recalibrates the thresholds on the int8 scores; dynamic needs none (ONNX only)")
    export.add_argument("--calibration-data", metavar="DIR",
                        help="folder of good images for --int8 static (default, for a run directory: the run's "
                             "held-out good images, which set its thresholds)")
    export.add_argument("--model", metavar="NAME", help="which model of the run")
    export.add_argument("--category", help="the model of this category")

    serve = commands.add_parser("serve", help="HTTP service: POST /predict, an operator page at /, GET /model")
    serve.add_argument("run_dir", metavar="RUN_DIR",
                       help="a run directory, a .pt checkpoint, an .onnx file or an OpenVINO folder")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--runtime", choices=RUNTIMES, default="torch")
    serve.add_argument("--workers", type=int, default=1, metavar="N", help="server processes, each with the model")
    serve.add_argument("--model", metavar="NAME", help="which model of the run (see run.json)")
    serve.add_argument("--api-key-file", metavar="PATH",
                       help="require the key in this file in the X-API-Key header (or set INPFORMER_API_KEY)")
    serve.add_argument("--api-key", help="the key itself: visible to every user in `ps`, prefer --api-key-file")
    serve.add_argument("--max-upload-mb", type=float, default=32.0, metavar="MB", help="request body limit")
    serve.add_argument("--max-pixels", type=int, metavar="N", help="per-image pixel limit (default 16 M)")
    serve.add_argument("--max-request-pixels", type=int, metavar="N",
                       help="pixels of all images of one request (default 16 M); beyond, 413")
    serve.add_argument("--max-inflight-pixels", type=int, metavar="N",
                       help="pixels of all requests being decoded, predicted or encoded, up to ~48 bytes each "
                            "(default 16 M: under 1 GiB); beyond, 503")
    serve.add_argument("--max-batch", type=int, default=8, metavar="B", help="images per inference call")
    serve.add_argument("--queue-size", type=int, default=64, metavar="N",
                       help="images waiting for inference; beyond, requests get 503")
    serve.add_argument("--feedback-dir", metavar="DIR",
                       help="let operators mark results as false rejects or missed defects on the page: the images "
                            "go to DIR/good/ and DIR/defective/ with a JSON sidecar (default: off)")

    watch = commands.add_parser("watch", help="predict images as cameras write them into a folder: "
                                              "OUT_DIR/results.jsonl, optional sorting and MQTT")
    watch.add_argument("model", metavar="RUN_DIR",
                       help="a run directory, a .pt checkpoint, an .onnx file or an OpenVINO folder")
    watch.add_argument("in_dir", metavar="IN_DIR", help="the folder to watch (subfolders too)")
    watch.add_argument("--out", required=True, metavar="OUT_DIR",
                       help="results.jsonl (one line per image, the record that makes restarts safe), watch.log")
    watch.add_argument("--sort", choices=("move", "link"),
                       help="move or link each image into OUT_DIR/good, defective or failed")
    watch.add_argument("--poll", type=float, metavar="SECONDS",
                       help="scan the folder every SECONDS instead of following file events (network shares)")
    watch.add_argument("--settle", type=float, default=1.0, metavar="SECONDS",
                       help="a file is complete once unchanged this long, or at once when renamed into place "
                            "(default 1)")
    watch.add_argument("--runtime", choices=RUNTIMES, default="torch")
    watch.add_argument("--batch-size", type=int, default=8, metavar="B", help="images that arrive together are "
                                                                                "predicted in batches of up to B")
    watch.add_argument("--category", help="category of the images (multi-class models infer it otherwise)")
    watch.add_argument("--model", dest="model_name", metavar="NAME", help="which model of the run (see run.json)")
    watch.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                       help=f"refuse larger images (default {MAX_PIXELS})")
    watch.add_argument("--mqtt", metavar="HOST:PORT", help="also publish each result line to this MQTT broker "
                                                            "(QoS 1; needs pip install 'inpformer[mqtt]')")
    watch.add_argument("--topic", default="inpformer/results", help="MQTT topic (default inpformer/results)")

    imported = commands.add_parser("import", help="turn the authors' released INP-Former weights (model.pth) into "
                                                  "a checkpoint; then calibrate it")
    imported.add_argument("checkpoint", metavar="CKPT.pth", help="a model.pth of the official INP-Former code")
    imported.add_argument("--backbone", choices=sorted(BACKBONES),
                          help="the encoder it was trained with (default dinov2reg_vitb14, as every released model)")
    imported.add_argument("--image-size", metavar="R|HxW", help="resize (default 448, as the released models)")
    imported.add_argument("--crop-size", metavar="C|HxW",
                          help="centre crop for `test` (default 392; deployment uses the whole resized image)")
    imported.add_argument("--out", required=True, metavar="MODEL.pt")

    audit = commands.add_parser("audit", help="find defective images among a run's good training images: each "
                                              "scored out-of-fold, the most suspicious listed with their maps")
    audit.add_argument("run_dir", metavar="RUN_DIR")
    audit.add_argument("--folds", type=int, default=5, metavar="K",
                       help="each image is scored by a model trained on the other K-1 folds (default 5)")
    audit.add_argument("--iterations", type=int, metavar="N", help="optimizer steps per fold (default: the run's)")
    audit.add_argument("--top", type=int, default=20, metavar="N", help="images shown in the report (default 20)")
    audit.add_argument("--model", metavar="NAME", help="only this model of the run")
    audit.add_argument("--quiet", action="store_true")

    demo = commands.add_parser("demo", help="train and evaluate on the ELPV solar-cell images shipped by PyPI")
    demo.add_argument("--out", default="runs/demo", metavar="DIR")
    demo.add_argument("--iterations", type=int, default=None)
    demo.add_argument("--quiet", action="store_true")
    return parser


def _add_data_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    data = parser.add_argument_group("data (a dataset root, several roots, or plain folders)")
    data.add_argument("--data", nargs="+", metavar="ROOT",
                      help="dataset root(s) in MVTec-AD, VisA or Real-IAD layout, or one category folder"
                           + ("" if required else "; default: the training data"))
    data.add_argument("--dataset", choices=("auto", *DATASET_KINDS[:-1]), default="auto",
                      help="layout of --data (default: detected)")
    data.add_argument("--realiad-json-dir", metavar="NAME", help="Real-IAD split folder, e.g. realiad_jsons_sv")
    data.add_argument("--data-good", metavar="DIR", help="plain folder of good images (instead of --data)")
    data.add_argument("--data-test-good", metavar="DIR", help="plain folder of good test images")
    data.add_argument("--data-test-defect", metavar="DIR", help="plain folder of defective test images")
    data.add_argument("--data-masks", metavar="DIR", help="masks of the defective test images (same names)")


def _training_options(args: argparse.Namespace) -> dict:
    """`train_run`'s options from the command line. With --resume: the interrupted training's, with the options
    given applied on top (on top of the --preset's instead, when given); `train_run` refuses those that differ."""
    given = {k: getattr(args, k) for k in CONFIG_OPTIONS if getattr(args, k) is not None}
    options = {"sources": _sources(args, required=not args.resume), "setting": args.setting,
               "categories": args.categories, "shots": args.shots, "repeats": args.repeats,
               "extra_good": args.extra_good}
    options = {key: value for key, value in options.items() if value is not None}
    if not args.resume:
        return {**options, "config": make_config(args.preset or "cpu", **given)}
    stored = resumable_training(args.resume)
    config = make_config(args.preset, **given) if args.preset else dataclasses.replace(stored["config"], **given)
    return {**stored, **options, "config": config}


def _sources(args: argparse.Namespace, required: bool) -> list[DataSource] | None:
    if args.data and args.data_good:
        raise InpformerError("give either --data ROOT or --data-good DIR, not both")
    if args.data_good:
        return [DataSource(args.data_good, "folder", args.data_test_good, args.data_test_defect, args.data_masks)]
    if args.data:
        return [DataSource(root, args.dataset, json_dir=args.realiad_json_dir) for root in args.data]
    if required:
        raise InpformerError("no training data: give --data ROOT (a dataset) or --data-good DIR (good images)")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            options = _training_options(args)
            if args.devices < 1:
                raise InpformerError(f"--devices must be at least 1, got {args.devices}")
            if args.devices > 1 and not distributed.launched():
                return distributed.spawn(main, args.devices, sys.argv[1:] if argv is None else list(argv))
            distributed.setup(options["config"].device)
            out = args.resume or args.out
            train_run(out=out, **options, progress=not args.quiet and distributed.is_main_process(),
                      resume=bool(args.resume), checkpoint_every=args.checkpoint_every, tracking=args.log)
            if distributed.is_main_process():
                print(f"trained; next: inpformer test {out}")
        elif args.command == "test":
            evaluation = test_run(args.run_dir, _sources(args, required=False), args.categories, args.model,
                                  args.zero_shot, args.save_maps, args.out, progress=not args.quiet,
                                  report=args.report, tracking=args.log)
            print(evaluation.table())
            if evaluation.recall:
                print("\ndecisions at the calibrated thresholds (rate: recall of defects, false rejects of good)")
                print(recall_table(evaluation.recall))
        elif args.command == "predict":
            rows, failures = predict_run(args.model, args.inputs, args.out, args.runtime, args.batch_size,
                                         args.category, args.model_name, args.max_pixels, progress=not args.quiet,
                                         min_defect_area=args.min_defect_area)
            defective = sum(r["decision"] == "defective" for r in rows)
            print(f"{len(rows)} images: {defective} defective, {len(rows) - defective} good"
                  f"{f', {len(failures)} failed' if failures else ''}; report: {args.out}/report.html")
            return 1 if failures else 0
        elif args.command == "calibrate":
            how = "inpformer " + shlex.join(sys.argv[1:] if argv is None else list(argv))
            thresholds = calibrate_run(args.run_dir, _sources(args, required=False), args.method,
                                       args.max_false_reject, args.model, progress=not args.quiet,
                                       image_threshold=args.image_threshold, pixel_threshold=args.pixel_threshold,
                                       category=args.category, min_defect_area=args.min_defect_area, how=how)
            for name, t in thresholds.items():
                images = "" if t.method == MANUAL else f", {t.num_good} good / {t.num_defective} defective images"
                area = f"; minimum defect area {describe_area(t.min_defect_area)}" if t.min_defect_area else ""
                print(f"{name}{f' ({args.category})' if args.category else ''}: image threshold {t.image:.6f}, "
                      f"pixel threshold {t.pixel:.6f} ({t.method}{images}){area}")
        elif args.command == "import":
            out = output_file(args.out, "--out", ".pt")
            INPFormer.from_official(args.checkpoint, args.backbone, args.image_size, args.crop_size).save(out)
            print(f"imported {out}; next, set its thresholds: inpformer calibrate {out} --data ROOT "
                  "(or --data-good DIR of good images)")
        elif args.command == "export":
            run_dir = args.run_dir if os.path.isdir(args.run_dir) else None
            paths = export_model(resolve_model(args.run_dir, args.model, args.category), args.onnx, args.int8,
                                 args.openvino, args.calibration_data, run_dir)
            print(f"exported {', '.join(map(str, paths))}")
        elif args.command == "serve":
            from .service.app import Settings, read_api_key, serve, upload_limit

            if args.api_key and args.api_key_file:
                raise InpformerError("give --api-key-file or --api-key, not both")
            pixels = {"max_pixels": args.max_pixels, "max_request_pixels": args.max_request_pixels,
                      "max_inflight_pixels": args.max_inflight_pixels}
            serve(args.run_dir, args.host, args.port, args.runtime, args.workers, args.model,
                  Settings(max_bytes=upload_limit(args.max_upload_mb), max_batch=args.max_batch,
                           queue_size=args.queue_size,
                           api_key=read_api_key(args.api_key_file) if args.api_key_file else args.api_key,
                           feedback_dir=args.feedback_dir,
                           **{name: value for name, value in pixels.items() if value is not None}))
        elif args.command == "audit":
            from .audit import audit_run

            suspects = audit_run(args.run_dir, args.folds, args.iterations, args.model, args.top,
                                 progress=not args.quiet)
            print("rank  z-score  category  image")
            for suspect in suspects[: args.top]:
                print(f"{suspect.rank:4d}  {suspect.z_score:7.2f}  {suspect.category}  {suspect.path}")
            print(f"all {len(suspects)} images: {args.run_dir}/audit/audit.csv; maps: {args.run_dir}/audit/report.html")
        elif args.command == "watch":
            from .service.watch import watch

            counts = watch(args.model, args.in_dir, args.out, args.runtime, args.model_name, args.category, args.sort,
                           args.poll, args.settle, args.batch_size, args.max_pixels, args.mqtt, args.topic)
            print(f"watched: {counts.predicted} image{'' if counts.predicted == 1 else 's'} ({counts.defective} "
                  f"defective), {counts.failed} failed; results: {args.out}/results.jsonl")
        elif args.command == "demo":
            from .demo import run_demo

            print(run_demo(args.out, iterations=args.iterations, progress=not args.quiet).table())
    except InpformerError as error:
        print(f"inpformer: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a file system failure the checks up front could not foresee (disk full, permissions)
        print(f"inpformer: error: {error.filename or ''}{': ' if error.filename else ''}{error.strerror or error}",
              file=sys.stderr)
        return 2
    except TrainingStopped as stopped:
        if os.environ.get("RANK", "0") == "0":  # every process stops at the same step; one says so
            print(f"inpformer: {stopped}", file=sys.stderr)
        return 128 + stopped.signal
    except KeyboardInterrupt:
        print("inpformer: interrupted", file=sys.stderr)
        return 130
    return 0


def _tokens(value: str) -> int | str:
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or 'all', got {value!r}") from None


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


if __name__ == "__main__":
    sys.exit(main())

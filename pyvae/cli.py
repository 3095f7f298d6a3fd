"""The ``pyvae`` command line."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import subprocess
import sys
import typing

import torch

import pyvae
from pyvae import demo as demo_module
from pyvae._device import check_device
from pyvae.errors import UserError

# What a user's mistake raises (a bad argument, a missing or damaged file, a busy directory): the
# command prints it as one line and exits with status 2. Anything else is a bug and keeps its
# traceback; PYVAE_TRACEBACK=1 shows the traceback of user errors too.
USER_ERRORS = (UserError, ValueError, TypeError, OSError)


def cmd_info(args) -> int:
    """Versions, devices and which backend can run on each device (and why not)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"pyvae {pyvae.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"triton {triton_version}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        name = torch.cuda.get_device_name() if device == "cuda" else "host CPU"
        print(f"\n{device} ({name}); auto picks {pyvae.ops.auto_backend(device)}")
        for backend, reason in pyvae.ops.backend_status(device).items():
            print(f"  {backend:10s} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


def cmd_bench(args) -> int:
    """Run the benchmarks of a source checkout (benchmarks/run.py)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(pyvae.__file__)))
    script = os.path.join(root, "benchmarks", "run.py")
    if not os.path.exists(script):
        print("pyvae bench: the benchmarks live in the source checkout (benchmarks/run.py), "
              "which this installation does not have", file=sys.stderr)
        return 2
    extra = (["--quick"] if args.quick else []) + (["--save", args.save] if args.save else [])
    extra += ["-k", args.select] if args.select else []
    return subprocess.call([sys.executable, script, *extra])


# ---- pyvae train ------------------------------------------------------------------------------

TRAIN_EPILOG = """\
examples:
  pyvae train --model VAE --data shapes2d --out runs/vae --steps 20000 --model-arg latent_dim=10
  pyvae train --config runs/btcvae.json --out runs/btcvae --lr 5e-4 --resume
  torchrun --nproc_per_node 4 -m pyvae.cli train --config cfg.json --gather-global-batch

config file (JSON; every key optional, command-line flags override it):
  {"model": {"name": "BetaTCVAE", "latent_dim": 10, "beta": 6},
   "data": {"spec": "shapes2d", "size": 20000},
   "eval_data": {"spec": "data/test.npy"},
   "train": {"steps": 50000, "batch_size": 256, "lr": 1e-3, "eval_fraction": 0.05}}
"train" takes the fields of pyvae.train.TrainConfig, and out_dir, device and progress.

A model's channels, image_size and dataset_size constructor arguments, when it has them and they
are not given, come from the data: channels and image_size from the dataset's image_shape
(C, H, W) (image_size is H for square images, else [H, W]), dataset_size is the number of
training examples (after --eval-fraction). KEY=VALUE values are parsed as JSON, else kept as
strings (latent_dim=10 is an int, beta=4.0 a float, name=foo the string "foo").

Outputs in --out: config.json, metrics.jsonl (one JSON record per log step; "split": "eval"
for evaluations) and checkpoint/ (model.safetensors, model.json, state.pt and manifest.json,
their SHA-256s, checked on load and on --resume), which pyvae.train.load_model(path) turns back
into a model. A .lock file keeps a second job off a run directory while one runs."""

def _add_train_config_flags(group) -> None:
    """One flag per TrainConfig field (--batch-size for batch_size), with its help, metavar and
    default; None when not given, so that --config's "train" section fills the rest."""
    from pyvae.train import TrainConfig
    hints = typing.get_type_hints(TrainConfig)
    for setting in dataclasses.fields(TrainConfig):
        flag, text = "--" + setting.name.replace("_", "-"), setting.metadata["help"]
        default = setting.default
        if hints[setting.name] is bool:
            group.add_argument(flag, dest=setting.name, action="store_true", default=None,
                               help=text)
            continue
        if isinstance(default, tuple):
            group.add_argument(flag, dest=setting.name, nargs=len(default), type=type(default[0]),
                               metavar=setting.metadata["metavar"],
                               help=f"{text} (default: {' '.join(map(str, default))})")
            continue
        kind = next(t for t in typing.get_args(hints[setting.name]) or [hints[setting.name]]
                    if t is not type(None))
        suffix = f" (default: {default})" if default is not None else ""
        group.add_argument(flag, dest=setting.name, type=kind,
                           metavar=setting.metadata["metavar"], help=text + suffix)


def add_train_parser(sub) -> argparse.ArgumentParser:
    train = sub.add_parser(
        "train", help="train a model (pyvae.train.fit) and write logs and checkpoints",
        description="Train a pyvae model on a dataset: AdamW, learning-rate and KL schedules, "
                    "mixed precision, evaluation, JSON-lines metrics, atomic checkpoints and "
                    "exact resume; data-parallel across processes under torchrun.",
        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_flags(train)
    train.set_defaults(func=cmd_train)
    return train


def _add_run_flags(train) -> None:
    """The model, data and training flags of ``pyvae train`` and ``pyvae train-grid``."""
    what = train.add_argument_group("model and data")
    what.add_argument("--config", metavar="FILE",
                      help='JSON file with "model", "data", "eval_data" and "train" sections')
    what.add_argument("--model", metavar="NAME",
                      help="registered model class, e.g. VAE, BetaTCVAE, PatchVAE, "
                           "HierarchicalVAE, CapacityAE")
    what.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                      help="model constructor argument (repeatable)")
    what.add_argument("--data", metavar="SPEC",
                      help="pyvae.data.load_dataset spec: shapes2d, digits, photos, a folder of "
                           "images or an .npy file")
    what.add_argument("--data-arg", action="append", default=[], metavar="KEY=VALUE",
                      help="load_dataset option (repeatable)")
    what.add_argument("--eval-data", metavar="SPEC", help="a separate evaluation dataset")
    what.add_argument("--eval-data-arg", action="append", default=[], metavar="KEY=VALUE",
                      help="load_dataset option of --eval-data (repeatable)")
    what.add_argument("--out", metavar="DIR", help="run directory (required here or as "
                                                   "train.out_dir in --config)")
    run = train.add_argument_group("training (pyvae.train.TrainConfig fields)")
    _add_train_config_flags(run)
    run.add_argument("--device", metavar="DEV",
                     help="e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu; "
                          "cuda:LOCAL_RANK under torchrun)")
    run.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                     help="no progress bar")


class _UsageError(UserError):
    """A bad combination of command-line flags or config entries."""


def _key_values(pairs: list[str], flag: str) -> dict:
    values = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise _UsageError(f"{flag} expects KEY=VALUE, got {pair!r}")
        try:
            values[key] = json.loads(text)
        except json.JSONDecodeError:
            values[key] = text
    return values


def _section(config: dict, name: str) -> dict:
    value = config.get(name, {})
    if not isinstance(value, dict):
        raise _UsageError(f'--config: "{name}" must be a JSON object, got {value!r}')
    return dict(value)


def _load_dataset(spec: str, options: dict):
    try:
        from pyvae.data import load_dataset
    except ImportError as error:
        raise _UsageError(f"--data needs pyvae.data.load_dataset, which cannot be imported "
                          f"({error})") from None
    return load_dataset(spec, **options)


def _data_kwargs(model_class, given: dict, dataset, train: dict) -> dict:
    """The model constructor's channels / image_size / dataset_size that ``given`` lacks, from
    the data (dataset_size: the training examples left after ``train``'s eval_fraction)."""
    from pyvae.train import collate_images, split_dataset
    wanted = [name for name in ("channels", "image_size", "dataset_size")
              if name in inspect.signature(model_class).parameters and name not in given]
    values = {}
    if "channels" in wanted or "image_size" in wanted:
        shape = getattr(dataset, "image_shape", None) or collate_images([dataset[0]]).shape[1:]
        channels, height, width = (int(n) for n in shape)
        values["channels"] = channels
        values["image_size"] = height if height == width else [height, width]
    if "dataset_size" in wanted:
        try:
            split = split_dataset(dataset, train.get("eval_fraction", 0.0), train.get("seed", 0))
        except ValueError as error:
            raise _UsageError(f"--eval-fraction: {error}") from None
        values["dataset_size"] = len(split[0])
    return {name: values[name] for name in wanted}


def _train_settings(args) -> tuple[dict, dict, dict | None, dict]:
    """Merge --config and the flags into (model, data, eval_data, train) sections."""
    from pyvae.train import TrainConfig
    config = {}
    if args.config:
        try:
            with open(args.config) as file:
                config = json.load(file)
        except OSError as error:
            raise _UsageError(f"--config {args.config!r}: cannot read it ({error.strerror or error})"
                              ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise _UsageError(f"--config {args.config!r} is not valid JSON: {error}") from None
        if not isinstance(config, dict):
            raise _UsageError(f"--config {args.config!r} must hold a JSON object with \"model\", "
                              f"\"data\", \"eval_data\" and \"train\" sections")
        unknown = set(config) - {"model", "data", "eval_data", "train"}
        if unknown:
            raise _UsageError(f"--config: unknown sections {sorted(unknown)}; expected model, "
                              f"data, eval_data, train")
    model = _section(config, "model")
    if args.model:
        model["name"] = args.model
    model.update(_key_values(args.model_arg, "--model-arg"))
    data = _section(config, "data")
    if args.data:
        data["spec"] = args.data
    data.update(_key_values(args.data_arg, "--data-arg"))
    eval_data = _section(config, "eval_data") or None
    if args.eval_data:
        eval_data = {**(eval_data or {}), "spec": args.eval_data}
    if args.eval_data_arg:
        if eval_data is None:
            raise _UsageError("--eval-data-arg needs --eval-data")
        eval_data.update(_key_values(args.eval_data_arg, "--eval-data-arg"))
    train = _section(config, "train")
    for name in TrainConfig.field_names() + ["device", "progress"]:
        if getattr(args, name) is not None:
            train[name] = getattr(args, name)
    # A run's length given on the command line replaces the config's, whichever unit it uses
    # (both flags at once reach fit, which says to give one).
    if args.steps is not None and args.epochs is None:
        train.pop("epochs", None)
    if args.epochs is not None and args.steps is None:
        train.pop("steps", None)
    if args.out:
        train["out_dir"] = args.out
    accepted = set(TrainConfig.field_names()) | {"out_dir", "device", "progress"}
    unknown = set(train) - accepted
    if unknown:
        raise _UsageError(f'unknown training options {sorted(unknown)} in "train"; '
                          f"it takes TrainConfig's fields and out_dir, device, progress: "
                          f"{sorted(accepted)}")
    for section, key, flag in [(model, "name", "--model"), (data, "spec", "--data"),
                               (train, "out_dir", "--out")]:
        if key not in section:
            raise _UsageError(f"{flag} is required (or give it in --config)")
    if eval_data is not None and "spec" not in eval_data:
        raise _UsageError('--config: "eval_data" needs a "spec"')
    return model, data, eval_data, train


def cmd_train(args) -> int:
    """Build the model and data from the flags and config, and run pyvae.train.fit."""
    from pyvae.models import MODELS
    from pyvae.train import MainRankFailed, TrainingDiverged, fit
    # Mistakes raise a UserError (or ValueError, ...), which main() prints as one line.
    model_config, data_config, eval_config, train = _train_settings(args)
    name = model_config.pop("name")
    if name not in MODELS:
        raise _UsageError(f"--model: unknown model {name!r}; registered: {sorted(MODELS)}")
    data_options = {k: v for k, v in data_config.items() if k != "spec"}
    dataset = _load_dataset(data_config["spec"], data_options)
    if eval_config is not None:
        train["eval_dataset"] = _load_dataset(
            eval_config["spec"], {k: v for k, v in eval_config.items() if k != "spec"})
    model_config.update(_data_kwargs(MODELS[name], model_config, dataset, train))
    if "device" in train:
        check_device(train["device"], "--device")
    train.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
    # The initial weights depend on the model seed alone (--model-seed, else --seed).
    torch.manual_seed(train.get("model_seed") if train.get("model_seed") is not None
                      else train.get("seed", 0))
    model = MODELS[name](**model_config)
    try:
        result = fit(model, dataset, **train,
                     extra_config={"data": data_config, "eval_data": eval_config})
    except FileExistsError as error:
        print(f"pyvae train: error: {error} (on the command line: --resume)", file=sys.stderr)
        return 2
    except (TrainingDiverged, MainRankFailed) as error:  # rank 0 prints its own error
        print(f"pyvae train: {_one_line(error)}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        summary = "".join(f", {key} {value:.4g}" for key, value in result.metrics.items()
                          if isinstance(value, float))
        print(f"pyvae train: step {result.step} (epoch {result.epoch:.2f}){summary}")
        print(f"  checkpoint: {result.checkpoint}\n  metrics:    {result.metrics_path}")
    return 0


# ---- pyvae train-grid -------------------------------------------------------------------------

TRAIN_GRID_EPILOG = """\
examples:
  pyvae train-grid --model VAE --model-arg architecture=mlp --model-arg latent_dim=10 \\
      --data shapes2d --out runs/beta-grid --steps 20000 --grid-arg beta=1,2,4,8 --grid-arg seed=0,1
  pyvae train-grid --config hvae.json --grid betas.json --out runs/hvae-grid --steps 5000

The grid: --grid FILE.json holds a list of grid points ([{"beta": 1}, {"beta": 4, "lr": 3e-4}])
or an object of value lists ({"betas": [[1, 1], [1, 4]], "seed": [0, 1]}: their Cartesian
product); or repeat --grid-arg KEY=V1,V2,... (a JSON list such as betas=[[1,1],[1,4]] is also
taken) for the Cartesian product of the values. In a grid point, lr and seed are the model's
learning rate and seed (initial weights and noise; --seed seeds the data order, shared by all
models); the other keys are model constructor arguments on top of --model-arg. Only float
hyper-parameters (beta, betas, alpha, gamma) can vary: every point must give the same network.

Outputs in --out: grid.json (the points), config.json, metrics.jsonl (records with "model": k),
checkpoint/ (the stacked grid, for --resume) and models/000, models/001, ... (each model,
readable with pyvae.train.load_model). pyvae report RUN_DIR draws the grid's heatmaps."""


def add_train_grid_parser(sub) -> argparse.ArgumentParser:
    grid = sub.add_parser(
        "train-grid", help="train K models of one architecture at once (pyvae.train.fit_grid)",
        description="Train one model per grid point (β, β per layer, α/γ, learning rate, seed) "
                    "in one process: stacked parameters, one batched step for all models, the "
                    "same data stream, a checkpoint of the whole grid and exact resume.",
        epilog=TRAIN_GRID_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    points = grid.add_argument_group("the grid")
    points.add_argument("--grid", metavar="FILE", dest="grid_file",
                        help="JSON file: a list of grid points, or an object of value lists")
    points.add_argument("--grid-arg", action="append", default=[], metavar="KEY=V1,V2",
                        help="values of one grid axis (repeatable: the Cartesian product)")
    _add_run_flags(grid)
    grid.set_defaults(func=cmd_train_grid)
    return grid


def _grid_values(pair: str) -> tuple[str, list]:
    key, sep, text = pair.partition("=")
    if not sep or not key or not text:
        raise _UsageError(f"--grid-arg expects KEY=V1,V2,..., got {pair!r}")
    try:
        values = json.loads(text)
    except json.JSONDecodeError:
        values = None
    if not isinstance(values, list):  # V1,V2,...: each parsed as JSON, else kept as a string
        values = [_key_values([f"{key}={part}"], "--grid-arg")[key] for part in text.split(",")]
    return key, values


def _grid_points(args) -> list[dict]:
    """The grid of --grid or --grid-arg (exactly one)."""
    from pyvae.train import grid_product
    if bool(args.grid_file) == bool(args.grid_arg):
        raise _UsageError("give the grid with --grid FILE or with --grid-arg KEY=V1,V2 (one "
                          "of them)")
    if args.grid_arg:
        return grid_product(dict(_grid_values(pair) for pair in args.grid_arg))
    try:
        with open(args.grid_file) as file:
            points = json.load(file)
    except OSError as error:
        raise _UsageError(f"--grid {args.grid_file!r}: cannot read it "
                          f"({error.strerror or error})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _UsageError(f"--grid {args.grid_file!r} is not valid JSON: {error}") from None
    if isinstance(points, dict):
        return grid_product(points)
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise _UsageError(f"--grid {args.grid_file!r} must hold a list of grid points (JSON "
                          f"objects) or an object of value lists")
    return points


def cmd_train_grid(args) -> int:
    """Build the grid's models and the data from the flags, and run pyvae.train.fit_grid."""
    from pyvae.models import MODELS
    from pyvae.train import TrainingDiverged, fit_grid
    model_config, data_config, eval_config, train = _train_settings(args)
    grid = _grid_points(args)
    if eval_config is not None:
        raise _UsageError("--eval-data: train-grid does not evaluate during training; "
                          "evaluate the models in --out/models afterwards")
    name = model_config.pop("name")
    if name not in MODELS:
        raise _UsageError(f"--model: unknown model {name!r}; registered: {sorted(MODELS)}")
    dataset = _load_dataset(data_config["spec"],
                            {k: v for k, v in data_config.items() if k != "spec"})
    model_config.update(_data_kwargs(MODELS[name], model_config, dataset, train))
    if "device" in train:
        check_device(train["device"], "--device")
    train.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")

    def make_model(**point):
        return MODELS[name](**{**model_config, **point})

    try:
        result = fit_grid(make_model, grid, dataset, **train, extra_config={"data": data_config})
    except FileExistsError as error:
        print(f"pyvae train-grid: error: {error} (on the command line: --resume)",
              file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"pyvae train-grid: {_one_line(error)}", file=sys.stderr)
        return 1
    print(f"pyvae train-grid: {len(grid)} models, step {result.step} (epoch "
          f"{result.epoch:.2f})")
    for k, metrics in enumerate(result.metrics):
        summary = ", ".join(f"{key} {value:.4g}" for key, value in metrics.items()
                            if isinstance(value, float))
        print(f"  model {k:03d} {json.dumps(grid[k])}: {summary}")
    print(f"  models:  {result.out_dir / 'models'}\n  metrics: {result.metrics_path}")
    return 0


# ---- pyvae encode -----------------------------------------------------------------------------

ENCODE_EPILOG = """\
examples:
  pyvae encode runs/patch9 data/images/ features/ --size 256 --crop 256
  pyvae encode runs/patch9 data/images.npy features/ --dtype float32 --logvar
  pyvae encode runs/patch9 data/images/ features/ --resume       # continue a killed run
  torchrun --nproc_per_node 4 -m pyvae.cli encode runs/patch9 data/images/ features/

OUT is a directory that numpy reads without pyvae:
  features.npy   (N, D, H-p+1, W-p+1) posterior means; features[n, :, y, x] is the code of the
                 p x p patch of image n with top-left corner (y, x)
  logvar.npy     the log-variances (--logvar)
  valid.npy      (N,) bool, False for unreadable images (their rows are NaN)
  manifest.json  image names in row order, skipped images and why, model config and hash,
                 source fingerprint, each chunk's SHA-256, "complete"
Each chunk is fsync'ed before it is marked done (OUT/chunks/), so a killed run continues with
--resume and gives the same bytes; resuming with another model, source or --dtype/--logvar/
--precision/--chunk-size/--size/--crop/--grayscale is refused, and a finished chunk that no
longer matches its SHA-256 is encoded again. OUT/.lock keeps a second job off the store."""


def _size_arg(text: str):
    """'256' -> 256 (the shorter side); '256x192' or '256,192' -> (256, 192) (height, width)."""
    parts = text.replace(",", "x").split("x")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected N or HxW with positive sizes, got {text!r}")
    return values[0] if len(values) == 1 else tuple(values)


def _max_pixels_arg(text: str):
    """'0' -> None (no limit); a positive int otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of pixels, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value or None


def add_encode_parser(sub) -> argparse.ArgumentParser:
    from pyvae.encode import encode_dataset
    defaults = {name: p.default for name, p in inspect.signature(encode_dataset).parameters.items()
                if p.default is not inspect.Parameter.empty}
    encode = sub.add_parser(
        "encode", help="encode every patch (stride 1) of an image collection into a feature "
                       "store (pyvae.encode.encode_dataset)",
        description="Run a trained patch VAE's encoder over every p x p patch, at stride 1, of "
                    "every image of a collection, streaming it to disk in resumable chunks; "
                    "data-parallel across processes under torchrun.",
        epilog=ENCODE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    encode.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a training run or checkpoint directory (pyvae.train.load_model)")
    encode.add_argument("source", metavar="SOURCE",
                        help="a folder of PNG/JPEG images (recursive), an .npy file of images, "
                             "or another pyvae.data.load_dataset spec")
    encode.add_argument("out", metavar="OUT", help="the feature store directory to write")
    encode.add_argument("--batch-size", type=int, default=defaults["batch_size"], metavar="B",
                        help="images per forward pass (default: %(default)s)")
    encode.add_argument("--chunk-size", type=int, default=defaults["chunk_size"], metavar="N",
                        help="images per chunk, the unit of writing and resuming "
                             "(default: %(default)s)")
    encode.add_argument("--tile-size", type=int, default=None, metavar="N",
                        help="encode big images in tiles of at most N×N pixels (same features, "
                             "bounded memory; default: whole images)")
    encode.add_argument("--dtype", choices=["float16", "float32"], default=defaults["dtype"],
                        help="stored dtype (default: %(default)s)")
    encode.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                        help="autocast compute precision (default: fp32)")
    encode.add_argument("--logvar", action="store_true",
                        help="also store the posterior log-variances (logvar.npy)")
    encode.add_argument("--resume", action="store_true",
                        help="continue the store in OUT (starts one if there is none)")
    encode.add_argument("--device", metavar="DEV",
                        help="e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu; "
                             "cuda:LOCAL_RANK under torchrun)")
    encode.add_argument("--num-workers", type=int, default=defaults["num_workers"], metavar="N",
                        help="DataLoader processes decoding images (default: %(default)s)")
    encode.add_argument("--size", type=_size_arg, metavar="N|HxW",
                        help="folders: resize first, N = shorter side (aspect kept) or HxW")
    encode.add_argument("--crop", type=_size_arg, metavar="N|HxW",
                        help="folders: then cut the centre N x N or H x W region")
    encode.add_argument("--grayscale", action="store_true", default=None,
                        help="folders: read images as 1 channel (default: when the model reads "
                             "1 channel)")
    encode.add_argument("--max-pixels", type=_max_pixels_arg, default=defaults["max_pixels"],
                        metavar="N", help="refuse images larger than N pixels (height × width), "
                        "checked from the file headers before decoding: a guard against "
                        "decompression bombs; 0 = no limit (default: %(default)s = 2^26)")
    encode.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar")
    encode.set_defaults(func=cmd_encode)
    return encode


def cmd_encode(args) -> int:
    """Load the checkpoint's model and run pyvae.encode.encode_dataset."""
    from pyvae.encode import encode_dataset
    from pyvae.train import load_model
    try:
        model = load_model(args.checkpoint)
    except USER_ERRORS as error:
        print(f"pyvae encode: error: CHECKPOINT: {error}", file=sys.stderr)
        return 2
    device = args.device
    if device is not None:
        check_device(device, "--device")
    if device is None and "RANK" not in os.environ and torch.cuda.is_available():
        device = "cuda"
    result = encode_dataset(  # its user errors: one line, by main()
        model, args.source, args.out, batch_size=args.batch_size,
        chunk_size=args.chunk_size, dtype=args.dtype, precision=args.precision,
        with_logvar=args.logvar, resume=args.resume, num_workers=args.num_workers,
        device=device, progress=args.progress, size=args.size, crop=args.crop,
        grayscale=args.grayscale, tile_size=args.tile_size, max_pixels=args.max_pixels)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"pyvae encode: {result.encoded} images in {result.seconds:.1f} s "
              f"({result.images_per_second:.1f} images/s); store {result.path}, features "
              f"{tuple(result.shape)} {args.dtype}")
        if result.skipped:
            print(f"  {len(result.skipped)} unreadable image(s) left as NaN rows (listed in "
                  f"{result.path / 'manifest.json'})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyvae", description=pyvae.__doc__)
    parser.add_argument("--version", action="version", version=f"pyvae {pyvae.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions and the backends available on each device")
    info.set_defaults(func=cmd_info)
    bench = sub.add_parser("bench", help="benchmark the ops against eager PyTorch and "
                                         "torch.compile (source checkout)")
    bench.add_argument("--quick", action="store_true", help="a small subset of the cases")
    bench.add_argument("--save", metavar="DIR", help="save the results JSON into DIR")
    bench.add_argument("-k", dest="select", help="pytest -k expression selecting cases")
    bench.set_defaults(func=cmd_bench)
    add_train_parser(sub)
    add_train_grid_parser(sub)
    add_encode_parser(sub)
    demo = sub.add_parser("demo", help="the main job on bundled photographs: train a patch VAE, "
                                       "encode at stride 1, report, draw (`make demo`)",
                          description=demo_module.__doc__)
    demo_module.add_arguments(demo)
    demo.set_defaults(func=lambda args: demo_module.main_from_args(args))
    from pyvae import report as report_module
    report = sub.add_parser(
        "report", help="render a training run into pictures and a markdown summary (report.md)",
        description=report_module.DESCRIPTION, epilog=report_module.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    report_module.add_arguments(report)
    report.set_defaults(func=report_module.main_from_args)
    from pyvae import reproduce as reproduce_module
    reproduce = sub.add_parser(
        "reproduce", help="reproduce a seed paper's finding in a small experiment (--list)",
        description=reproduce_module.__doc__.split("\n\n")[0], epilog=reproduce_module.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    reproduce_module.add_arguments(reproduce)
    reproduce.set_defaults(func=reproduce_module.main_from_args)
    return parser


def _one_line(error: BaseException) -> str:
    """An exception's message on one line (KeyError-style quotes and newlines removed)."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(text.split()) or type(error).__name__


def main(argv=None) -> int:
    """Run one ``pyvae`` command; returns its exit status (2 for a user error, 130 when
    interrupted)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"pyvae {args.command}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        if os.environ.get("PYVAE_TRACEBACK", "0") not in ("", "0"):
            raise
        print(f"pyvae {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``pvae train --config FILE``: flags read from a file, which the command line overrides.

A file is a JSON object (``.json``) or a YAML mapping (``.yaml``/``.yml``, with PyYAML, the
``yaml`` extra) of either kind:

- **flags**: ``{"model": "vae", "latent_dim": 20, "lr_schedule": "cosine", ...}``, the long
  names of ``pvae train``'s flags (``latent-dim`` or ``latent_dim``), values as on the command
  line (a list for a flag that takes several, ``true``/``false`` for a switch);
- **a run's own config.json**: its nested record (``model_config``, ``training.loss``,
  ``training.optim``, ...) is mapped back to the flags that wrote it (:func:`record_flags`),
  so that ``pvae train --config runs/X/config.json --out runs/Y`` re-runs X.

The file's flags are placed before the command line's, so a flag given on both takes the
command line's value (a repeatable flag, ``--logger``, takes both); a data source on the
command line (``--dataset``, ``--data-file``, ``--image-folder``) replaces the file's. Every
value is checked as the command line checks it, and an error names the file and the key.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
from pathlib import Path

from pvae.autoencoders import AutoencoderLoss
from pvae.inference import LOSSES
from pvae.runs import REGISTRY, RunError
from pvae.train import SCHEDULES, Adam, AdamW
from pvae.versions import FormatError, check_format

from . import train

__all__ = ["MAX_CONFIG_FILE_BYTES", "expand", "read_file", "record_flags"]

#: The largest config file read.
MAX_CONFIG_FILE_BYTES = 1 << 20
#: ``model_config`` keys that ``pvae train`` derives from the data: not flags.
_DERIVED = ("x_dim", "c_dim", "num_classes", "image_shape")
#: ``model_config`` keys that are flags under another name, per model.
_RENAMED = {"ae": {"code_dim": "latent_dim"}, "linear-ae": {"code_dim": "latent_dim"},
            "mae": {"embed_dim": "latent_dim"}}
#: Top-level keys of a run's record that are not flags: what wrote it, what the data gave.
_RECORD_ONLY = ("format", "versions", "image_shape", "data_sha256", "model_config", "training",
                "binarize", "early_stopping")
#: The data source flags: one given on the command line replaces the file's.
_SOURCES = ("dataset", "data_file", "image_folder")


def read_file(path) -> dict:
    """The mapping in a JSON or YAML config file.

    :raises RunError: the file is missing, too large, not JSON/YAML, not a mapping, or YAML
        without PyYAML.
    """
    path = Path(path)
    if not path.is_file():
        raise RunError(f"--config {path}: no such file")
    with open(path, "rb") as f:
        raw = f.read(MAX_CONFIG_FILE_BYTES + 1)
    if len(raw) > MAX_CONFIG_FILE_BYTES:
        raise RunError(f"--config {path} is larger than {MAX_CONFIG_FILE_BYTES} bytes, far more "
                       "than a run's settings")
    suffix = path.suffix.lower()
    try:
        text = raw.decode("utf-8")
        if suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise RunError(f"--config {path}: reading YAML needs PyYAML: pip install "
                               "'pvae-ppl[yaml]' (or write the file as JSON)") from None
            try:
                settings = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise RunError(f"--config {path} is not valid YAML ({' '.join(str(e).split())})"
                               ) from None
        elif suffix == ".json":
            settings = json.loads(text)
        else:
            raise RunError(f"--config {path}: pvae reads .json, .yaml and .yml files")
    except UnicodeDecodeError:
        raise RunError(f"--config {path} is not a UTF-8 text file") from None
    except json.JSONDecodeError as e:
        raise RunError(f"--config {path} is not valid JSON ({e})") from None
    except RecursionError:
        raise RunError(f"--config {path} nests too deeply") from None
    if not isinstance(settings, dict):
        raise RunError(f"--config {path} must hold a mapping of flags to values, got a "
                       f"{type(settings).__name__}")
    return settings


def expand(parser: argparse.ArgumentParser, argv: list[str], args) -> argparse.Namespace:
    """``args`` parsed again with the flags of ``args.config`` placed before the command
    line's (which therefore override them).

    :raises RunError: see :func:`read_file`, :func:`record_flags`, and an unknown key or a bad
        value in the file (named with the file).
    """
    path = args.config
    settings = read_file(path)
    flags = record_flags(settings, path) if _is_record(settings) else _flat(settings, path)
    actions = _train_actions(parser)
    given = set()
    for token in argv:
        action = actions.get(token.split("=", 1)[0]) if token.startswith("--") else None
        if action is not None:
            given.add(action.dest)
    if given & set(_SOURCES):  # the command line's data source replaces the file's
        flags = {k: v for k, v in flags.items() if k not in _SOURCES}
    tokens = []
    for dest, value in flags.items():
        tokens += _tokens(actions, dest, value, path)
    where = argv.index("train") + 1
    return parser.parse_args([*argv[:where], *tokens, *argv[where:]])


def _train_actions(parser) -> dict:
    """``pvae train``'s actions by option string and by dest."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    actions = {}
    for action in sub.choices["train"]._actions:
        for option in action.option_strings:
            actions[option] = action
        if action.option_strings and action.dest not in ("help", "config"):
            actions.setdefault(action.dest, action)
    return actions


def _flat(settings: dict, path) -> dict:
    """A file of flags: its keys as argparse dests."""
    flags, unknown = {}, []
    for key, value in settings.items():
        dest = str(key).removeprefix("--").replace("-", "_")
        if dest in ("help", "config") or dest not in _dests():
            unknown.append(str(key))
        else:
            flags[dest] = value
    if unknown:
        raise RunError(f"--config {path}: unknown setting(s) {', '.join(unknown)}; the settings "
                       "are pvae train's flags (e.g. latent_dim, lr_schedule: see pvae train "
                       "--help), or a run's own config.json")
    return flags


def _dests() -> set:
    parser = argparse.ArgumentParser()
    train.add_parser(parser.add_subparsers())
    return {k for k in _train_actions(parser) if not k.startswith("-")}


def _tokens(actions: dict, dest: str, value, path) -> list[str]:
    """The command-line tokens of one setting, its value checked as the command line would."""
    action = actions[dest]
    flag = max(action.option_strings, key=len) if not isinstance(
        action, argparse.BooleanOptionalAction) else action.option_strings[0]
    where = f"--config {path}: {dest}"
    if value is None:
        return []
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise RunError(f"{where} must be true or false, got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [flag if value else f"--no-{flag[2:]}"]
        return [flag] if value else []
    many = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)
    values = value if isinstance(value, list) and many else [value]
    if isinstance(value, (list, dict)) and not many or any(
            isinstance(v, (list, dict)) for v in values):
        raise RunError(f"{where} must be {'a list of values' if many else 'one value'}, got "
                       f"{value!r}")
    if not values:
        raise RunError(f"{where} is an empty list")
    texts = [_text(v) for v in values]
    for text in texts:
        _check(action, text, where)
    if isinstance(action, argparse._AppendAction):
        return [t for text in texts for t in (flag, text)]
    return [flag, *texts]


def _text(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return value if isinstance(value, str) else repr(value) if isinstance(value, float) \
        else str(value)


def _check(action, text: str, where: str) -> None:
    try:
        value = action.type(text) if action.type else text
    except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
        raise RunError(f"{where}: {e}") from None
    if action.choices is not None and value not in action.choices:
        raise RunError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")


# ---------------------------------------------------------------------------------------------
# a run's record -> flags


def _is_record(settings: dict) -> bool:
    return "model_config" in settings or "training" in settings


def record_flags(record: dict, path) -> dict:
    """The flags that rebuild a run from its record (``config.json``): data, model (from
    ``model_config``), loss (``training.loss``), optimizer and schedule (``training.optim``),
    batch size, epochs, early stopping.

    :raises RunError: a record of a model ``pvae train`` does not build (ppca), or a setting
        that no flag can set (a Pyro loss, a beta schedule of your own, a model argument
        beyond the flags), or another run format.
    """
    where = f"--config {path}"
    try:
        check_format(record, path)
    except FormatError as e:
        raise RunError(f"{where}: {e}") from None
    model = record.get("model")
    if model not in train.TRAINABLE:
        raise RunError(f"{where} is the record of a {model!r} run; pvae train builds "
                       f"{', '.join(train.TRAINABLE)}" + (" (re-run a ppca run with pvae ppca)"
                                                          if model == "ppca" else ""))
    dests = _dests()
    flags = {k: v for k, v in record.items() if k not in _RECORD_ONLY}
    unknown = sorted(k for k in flags if k not in dests)
    if unknown:
        raise RunError(f"{where}: unknown setting(s) {', '.join(unknown)} in a run's record")
    if flags.get("dataset") in train.OWN_DATA.values():
        del flags["dataset"]  # implied by data_file / image_folder
    binarize = record.get("binarize")
    flags["binarize"] = "none" if binarize is None else binarize
    stopping = record.get("early_stopping")
    if isinstance(stopping, dict):
        flags["early_stopping"], flags["min_delta"] = stopping.get("patience"), \
            stopping.get("min_delta")
    flags.update(_model_flags(model, record.get("model_config"), where))
    training = record.get("training") or {}
    for key in ("batch_size", "num_epochs"):
        if key in training:
            flags[key] = training[key]
    loss = training.get("loss") or {}
    flags.update(_autoencoder_loss_flags(loss, where) if model in train.AUTOENCODERS
                 else _svi_loss_flags(loss, where))
    flags.update(_optim_flags(training.get("optim") or {}, where))
    return flags


def _model_flags(model: str, model_config, where) -> dict:
    if not isinstance(model_config, dict):
        raise RunError(f"{where}: model_config must be an object, got "
                       f"{type(model_config).__name__}")
    renamed = _RENAMED.get(model, {})
    flags = {}
    defaults = _defaults(REGISTRY[model])
    for key, value in model_config.items():
        dest = renamed.get(key, key)
        if key in _DERIVED:
            continue
        if dest in train.MODEL_FLAGS and model in train.MODEL_FLAGS[dest][0]:
            flags[dest] = value
        elif key in defaults and value == defaults[key]:
            continue  # an argument without a flag, at the value pvae train gives it
        else:
            raise RunError(f"{where}: model_config.{key} = {value!r} cannot be set by a flag of "
                           f"pvae train (it builds {model} with {key} = {defaults.get(key)!r})")
    return flags


def _defaults(cls) -> dict:
    """A constructor's defaults as a record holds them (tuples as lists)."""
    plain = lambda v: [plain(x) for x in v] if isinstance(v, (tuple, list)) else v  # noqa: E731
    return {k: plain(p.default) for k, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _svi_loss_flags(loss: dict, where) -> dict:
    name = loss.get("name")
    if name not in LOSSES:
        raise RunError(f"{where}: training.loss {name!r} is not one of pvae train's estimators "
                       f"({', '.join(sorted(LOSSES))})")
    flags, defaults = {"estimator": name}, _defaults(LOSSES[name])
    for key, value in loss.items():
        if key == "name":
            continue
        if key == "beta":
            flags.update(_beta_flags(value, where))
        elif key in ("num_particles", "analytic_kl", "gradient", "baseline"):
            if value != defaults.get(key):
                flags[key] = "none" if key == "baseline" and value is None else value
        elif value != defaults.get(key):
            raise RunError(f"{where}: training.loss.{key} = {value!r} cannot be set by a flag of "
                           "pvae train")
    return flags


def _beta_flags(beta, where) -> dict:
    """``--beta`` and the annealing flags from the loss's recorded beta: a number, or the
    ``repr`` of a warm-up or cyclical schedule."""
    if isinstance(beta, (int, float)) and not isinstance(beta, bool):
        return {"beta": float(beta)}
    text = str(beta)
    number = r"([0-9.eE+-]+)"
    warmup = re.fullmatch(rf"LinearWarmup\((\d+), start=0\.0, end={number}\)", text)
    if warmup:
        return {"kl_warmup_steps": int(warmup[1]), "beta": float(warmup[2])}
    cycle = re.fullmatch(rf"Cyclical\((\d+), ratio=0\.5, end={number}\)", text)
    if cycle:
        return {"kl_cycle_steps": int(cycle[1]), "beta": float(cycle[2])}
    raise RunError(f"{where}: training.loss.beta = {text!r} cannot be set by pvae train's flags "
                   "(--beta, --kl-warmup-steps, --kl-cycle-steps)")


def _autoencoder_loss_flags(loss: dict, where) -> dict:
    defaults = _defaults(AutoencoderLoss)
    flags = {}
    for key, value in loss.items():
        if key == "name":
            continue
        if key not in defaults:
            raise RunError(f"{where}: training.loss.{key} is not a setting of the autoencoders' "
                           "loss")
        if value != defaults[key]:
            flags[key] = "none" if value is None else value
    return flags


def _optim_flags(optim: dict, where) -> dict:
    names = {cls.__name__: name for name, cls in train.OPTIMIZERS.items()}
    if optim.get("name") not in names:
        raise RunError(f"{where}: training.optim {optim.get('name')!r} is not one of pvae "
                       f"train's optimizers ({', '.join(names)})")
    cls = {"Adam": Adam, "AdamW": AdamW}[optim["name"]]
    flags = {"optimizer": names[optim["name"]], "lr": optim.get("lr")}
    if optim.get("clip_norm") is not None:
        flags["clip_norm"] = optim["clip_norm"]
    if optim.get("weight_decay") != _defaults(cls)["weight_decay"]:
        flags["weight_decay"] = optim.get("weight_decay")
    schedule = optim.get("schedule")
    if schedule is None:
        return flags
    by_class = {cls.__name__: name for name, cls in SCHEDULES.items()}
    if not isinstance(schedule, dict) or schedule.get("name") not in by_class:
        raise RunError(f"{where}: training.optim.schedule {schedule!r} is not one of pvae "
                       f"train's schedules ({', '.join(SCHEDULES)})")
    name = by_class[schedule["name"]]
    flags["lr_schedule"] = name  # (ConstantLR: pvae train records no schedule for constant)
    to_flag = {param: dest for dest, params in train.SCHEDULE_FLAGS.items() for param in params}
    defaults = _defaults(SCHEDULES[name])
    for key, value in schedule.items():
        if key == "name":
            continue
        if key in to_flag:
            flags[to_flag[key]] = value
        elif value != defaults.get(key):
            raise RunError(f"{where}: training.optim.schedule.{key} = {value!r} cannot be set by "
                           "a flag of pvae train")
    return flags

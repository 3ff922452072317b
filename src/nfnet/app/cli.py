"""The command line in front of every entry point: a bad override costs one line, not a traceback.

`run_entry_point` is the whole of train.py, eval.py, predict.py and export.py. Before Hydra takes
over, `precheck` composes the config exactly as Hydra will (for a multirun: every job of the
sweep, up to a limit) and runs the entry point's checks on it, so that an unknown group option or
key, an unparsable override or a bad value is reported as
    config error: <key>=<value> ...what is allowed...
with exit status 2, before any output directory is created or any data is touched. Hydra's own
reports of the same mistakes are several lines long; here they are reduced to one.
"""

from __future__ import annotations

import difflib
import itertools
import logging
import os
import re
import shutil
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nfnet.app.checks import CHECKS
from nfnet.app.runs import in_multirun
from nfnet.app.schema import ENTRIES, constraint_at, register
from nfnet.app.values import shown
from nfnet.errors import ConfigError, InputError, TrainingStopped

# A sweep is checked job by job up to this many jobs; beyond that the first ones stand for all.
MAX_CHECKED_JOBS = 64


def fail(message: str) -> None:
    print(f"config error: {message}", file=sys.stderr)
    sys.exit(2)


def run_entry_point(script: str, entry: str) -> None:
    """Check the command line, then run the entry's task (nfnet.app.tasks.TASKS) under Hydra with
    `conf/<entry>.yaml`. A config or input error is one line and exit status 2; a run stopped on
    purpose (non-finite steps in a row) one line and exit status 1. train.py returns its
    `optimized_metric` to sweepers."""
    import hydra

    root = Path(script).resolve().parent
    os.environ.setdefault("NFNET_ROOT", str(root))
    # Bad overrides are reported in one line before Hydra creates a run directory.
    precheck(root / "conf", entry)

    @hydra.main(version_base="1.3", config_path=str(root / "conf"), config_name=entry)
    def main(cfg: DictConfig) -> float | None:
        # Lightning is imported only once the command line is known good.
        from nfnet.app.tasks import TASKS

        _route_lightning_logs()
        try:
            result = TASKS[entry](cfg)
        except (ConfigError, InputError) as error:
            fail(str(error))
        except TrainingStopped as error:
            print(f"training stopped: {error}", file=sys.stderr)
            sys.exit(1)
        if entry != "train":
            return None
        value = result.get(cfg.get("optimized_metric"))
        return float(value) if value is not None else None

    main()


def _route_lightning_logs() -> None:
    """Lightning installs its own console handler when imported before logging is configured;
    hand its records to the handlers Hydra set up, so each line appears once, in the run's log
    file too."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True


def precheck(config_dir: str | Path, entry: str, argv: list[str] | None = None) -> None:
    """Validate the command line of an entry point; exits with status 2 on the first problem."""
    register()
    try:
        _precheck(Path(config_dir), entry, sys.argv[1:] if argv is None else argv)
    except ConfigError as error:
        fail(str(error))


def _precheck(config_dir: Path, entry: str, argv: list[str]) -> None:
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    # Help, config printing and shell completion must work even on a config with bad values;
    # an extra config path/dir changes the search path, which is Hydra's to resolve.
    if any((args.help, args.hydra_help, args.cfg, args.info, args.shell_completion, args.experimental_rerun,
            args.config_path, args.config_dir)):
        return
    config_name = args.config_name or entry
    check = CHECKS.get(entry)
    overrides = _parse(args.overrides)
    jobs = _sweep_jobs(config_dir, overrides) if args.multirun else [list(args.overrides)]
    for number, job in enumerate(jobs[:MAX_CHECKED_JOBS]):
        cfg = _compose(config_dir, config_name, job, ENTRIES.get(entry))
        if args.multirun and number == 0:
            _check_launcher(cfg)
        if check is None:
            continue
        # Jobs of a multirun may run on other machines (SLURM): only portable checks here; each
        # job checks its own machine again when it starts.
        multirun = args.multirun or in_multirun(cfg)
        try:
            check(cfg, not multirun)
        except OmegaConfBaseException as error:
            raise ConfigError(_first_line(error)) from None


def _check_launcher(cfg: DictConfig) -> None:
    """A SLURM sweep started where SLURM is not: submitit would end in a traceback after Hydra
    created the sweep directory."""
    target = str(OmegaConf.select(cfg, "hydra.launcher._target_", default=""))
    # submitit tells a SLURM machine by its `srun`.
    if target.endswith(".SlurmLauncher") and shutil.which("srun") is None:
        raise ConfigError(
            "launcher=slurm submits each job to SLURM, but this machine has no `srun` on its PATH: "
            "run the command on a SLURM login node, or try the sweep here with hydra/launcher=submitit_local"
        )


def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except ValueError:
        # Python refuses to read an integer of more than sys.get_int_max_str_digits() digits.
        bad = next((o for o in overrides if _unparsable(o)), " ".join(overrides))
        raise ConfigError(
            f"{shown(bad)}: {bad.split('=', 1)[0]} is given a number too long to read; no setting takes one of more "
            f"than {sys.get_int_max_str_digits()} digits"
        ) from None
    except OverrideParseException as error:
        bad = next((o for o in overrides if _unparsable(o)), " ".join(overrides))
        # The shell expands ~ only at the start of a word, and `key=~/x` does not start with it.
        home = "; Hydra does not expand ~, write $HOME/ instead" if "=~" in bad else ""
        raise ConfigError(
            f"cannot parse the override {shown(bad)}: {_first_line(error)}{home} "
            "(grammar: https://hydra.cc/docs/1.3/advanced/override_grammar/basic/)"
        ) from None


def _unparsable(override: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        OverridesParser.create().parse_overrides([override])
    except (OverrideParseException, ValueError):
        return True
    return False


def group_options(config_dir: Path, group: str) -> list[str] | None:
    """The options of a config group in conf/, or None when `group` is not one of its groups."""
    folder = config_dir / group
    if not folder.is_dir():
        return None
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _sweep_jobs(config_dir: Path, overrides) -> list[list[str]]:
    """The override list of each job of a basic sweep (cartesian product, as Hydra's)."""
    choices: list[list[str]] = []
    for override in overrides:
        key = override.get_key_element()
        if not override.is_sweep_override():
            choices.append([override.input_line])
        elif override.is_interval_sweep():
            continue  # a continuous range (Optuna) has no jobs to list; the config default stands in
        elif type(override.value()).__name__ == "Glob":
            options = group_options(config_dir, override.key_or_group) or []
            choices.append([f"{key}={name}" for name in override.value().filter(options)])
        else:
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
    return [list(job) for job in itertools.islice(itertools.product(*choices), MAX_CHECKED_JOBS)]


def _compose(config_dir: Path, config_name: str, overrides: list[str], schema: type | None = None) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import ValidationError

    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3", job_name=config_name):
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
            # `${hydra:...}` interpolations (launcher=slurm's device count) need the hydra node set.
            HydraConfig.instance().set_config(cfg)
            return cfg
    except MissingConfigException as error:
        raise ConfigError(_missing_option(config_dir, error)) from None
    except (HydraException, OmegaConfBaseException) as error:
        cause = error.__cause__ if isinstance(error.__cause__, ValidationError) else error
        if isinstance(cause, ValidationError) and schema is not None:
            # The schema's types refused the value before any check ran: the field's own
            # constraint says what is allowed, in the words its check would have used.
            message = _type_error(cause, overrides, schema)
            if message:
                raise ConfigError(message) from None
        raise ConfigError(_composition_error(config_dir, config_name, overrides, error)) from None


def _type_error(error, overrides: list[str], schema: type) -> str | None:
    key = getattr(error, "full_key", None)
    constraint = constraint_at(schema, key) if key else None
    if constraint is None:
        return None
    typed = next((o.split("=", 1)[1] for o in overrides if o.lstrip("+~").split("=", 1)[0] == key), None)
    value = typed if typed is not None else getattr(error, "value", None)
    return constraint.message(key, value)


def _missing_option(config_dir: Path, error) -> str:
    missing = error.missing_cfg_file or ""
    group, _, option = missing.rpartition("/")
    if not group:
        return _first_line(error)
    options = group_options(config_dir, group)
    if options is None:  # a group of Hydra's own (hydra/launcher, hydra/sweeper) or of a plugin
        options = list(error.options or [])
    # `base` is each group's schema (nfnet.app.schema), not an option to choose.
    options = [o for o in options if o != "base"]
    return f"{group}={option} is not an option of the {group} config group{_did_you_mean(option, options)}; " \
           f"choose one of: {', '.join(options)}"


def _composition_error(config_dir: Path, config_name: str, overrides: list[str], error: Exception) -> str:
    text = str(error)
    match = re.search(r"Could not override '([^']+)'", text)
    if match:
        key = match.group(1)
        override = next((o for o in overrides if o.split("=", 1)[0] == key), key)
        rest = [o for o in overrides if o != override]
        try:
            cfg = _compose(config_dir, config_name, rest)
        except ConfigError:
            cfg = None
        known = _flat_keys(cfg) if cfg is not None else []
        parent = OmegaConf.select(cfg, key.rpartition(".")[0]) if cfg is not None and "." in key else None
        schema = OmegaConf.get_type(parent) if isinstance(parent, DictConfig) else dict
        if schema not in (dict, None):
            # A node of the schema has a fixed set of keys: `+key=value` would be refused too.
            return f"{override}: there is no config key {key!r}{_did_you_mean(key, known)}; " \
                   f"{key.rpartition('.')[0]} has only the keys of {schema.__name__} (nfnet.app.schema)"
        return f"{override}: there is no config key {key!r}{_did_you_mean(key, known)}; " \
               f"to add a new key write +{override}"
    match = re.search(r"An item is already at '([^']+)'", text)
    if match:
        return f"{match.group(1)} already exists: drop the leading + to change it (++ adds or changes)"
    match = re.search(r"Ambiguous value for argument '([^']+)'", text)
    if match:
        return f"{match.group(1)} lists several values: add -m to sweep over them, or write a list as [a,b]"
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _flat_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in cfg.keys():
        if key == "hydra":
            continue
        node = cfg._get_node(key)
        keys.append(f"{prefix}{key}")
        if isinstance(node, DictConfig):
            keys.extend(_flat_keys(node, f"{prefix}{key}."))
    return keys


def _did_you_mean(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__

"""What a job runs and what it is sent with: the payload (an experiment spec or a pipeline, validated here) and
the package, one zip that Ray unpacks as the job's ``working_dir``.

The package is the project folder, packed the way Ray packs a ``working_dir`` (``.gitignore``, ``.rayignore`` and
``--exclude`` honoured; ``SECRETS`` such as ``.env`` files, keys and Ray's token always left out), plus the
*effective* spec (the YAML with the overrides applied) at ``.gpt2exp-submit/<submission id>.yaml``, so the job
runs exactly what was validated here, wherever the spec file lived."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from gpt2exp import _ray_compat
from gpt2exp.jobs.connection import SubmitError, quiet_ray_logs
from gpt2exp.spec import ExperimentSpec, load_spec, parse_overrides

SPEC_DIR = ".gpt2exp-submit"  # where the effective spec lies inside the uploaded package
PACKAGE_LIMIT = 100 * 1024**2  # Ray refuses working_dir packages of 100 MiB and more
PACKAGE_WARNING = 25 * 1024**2
# never uploaded, whatever the ignore files say: dotenv files, Ray's token folder, SSH keys, keys, credentials
SECRETS = [".env*", ".ray/", "id_*", "*.pem", "*.key", "*credentials*"]
ALWAYS_EXCLUDED = [".git", ".venv", "venv", "__pycache__", SPEC_DIR, *SECRETS]  # Ray's defaults, plus ours


@dataclass
class Payload:
    """What a job runs, validated here: an experiment spec or a pipeline (its YAML travels in the package)."""

    name: str  # the experiment's or the pipeline's: names the submission
    summary: str  # e.g. "2 variant(s)", for the notes
    experiments: list[ExperimentSpec]  # what it trains (the resource and data rules apply to each)
    tracking_uri: str | None  # given in the file (else MLFLOW_TRACKING_URI); None with tracking off
    tracking: bool
    yaml_text: str
    command: list[str]  # the gpt2exp words before the file: ["run"] or ["pipeline", "run"]
    extra_args: list[str] = field(default_factory=list)  # after the common options (e.g. --from STAGE)
    mlflow_experiment: str = ""  # where to watch it in MLflow


def effective_spec_yaml(spec_path: Path, overrides: Iterable[str]) -> str:
    """The spec file with the overrides applied (before validation: what ``load_spec`` validates)."""
    from gpt2exp.spec import set_dotted

    raw = yaml.safe_load(Path(spec_path).read_text())
    for key, value in parse_overrides(overrides).items():
        set_dotted(raw, key, value)
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)


def _create_package(folder: Path, target: Path, excludes: list[str]) -> None:
    """Zip ``folder`` the way Ray packs a ``working_dir`` (``.gitignore``, ``.rayignore``, excludes)."""
    quiet_ray_logs()
    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    _ray_compat.create_package(folder, target, excludes, include_gitignore)


def build_package(working_dir: Path, spec_name: str, spec_yaml: str, target: Path, excludes: Iterable[str] = ()) -> Path:
    """The job's ``working_dir`` as one zip: the project folder, the effective spec at
    ``.gpt2exp-submit/<spec_name>``, and the ``gpt2exp`` package itself when the folder does not hold it."""
    _create_package(working_dir, target, [*ALWAYS_EXCLUDED, *excludes])
    with zipfile.ZipFile(target, "a", compression=zipfile.ZIP_DEFLATED) as z:
        names = set(z.namelist())
        z.writestr(f"{SPEC_DIR}/{spec_name}", spec_yaml)
        if "gpt2exp/__init__.py" not in names:  # run from elsewhere: ship the package that is imported here
            package = Path(__file__).resolve().parents[1]
            for path in sorted(package.rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                    z.write(path, PurePosixPath("gpt2exp", *path.relative_to(package).parts).as_posix())
    size = target.stat().st_size
    if size >= PACKAGE_LIMIT:
        raise SubmitError(
            f"the project folder {working_dir} packs to {size / 1024**2:.0f} MiB, over Ray's limit of 100 MiB: add the big "
            "files or folders (data, checkpoints, outputs) to .rayignore, or pass --exclude PATTERN",
            2,
        )
    return target


def experiment_payload(spec_path: Path, overrides: Iterable[str] | None = None) -> Payload:
    """An experiment spec with its overrides, run by the Ray launcher."""
    overrides = [*(overrides or []), "parallel.launcher=ray"]
    spec = load_spec(spec_path, overrides)
    return Payload(
        name=spec.name,
        summary=f"{len(spec.expand())} variant(s)",
        experiments=[spec],
        tracking_uri=spec.tracking.tracking_uri,
        tracking=spec.tracking.enabled,
        yaml_text=effective_spec_yaml(spec_path, overrides),
        command=["run"],
        mlflow_experiment=spec.tracking.experiment_name or spec.name,
    )


def pipeline_payload(path: Path, extra_args: Iterable[str] = ()) -> Payload:
    """A pipeline, made self-contained (its run stages' specs inline) so the job needs no other file."""
    from gpt2exp.pipeline.spec import RunStage, load_pipeline
    from gpt2exp.pipeline.state import EXPERIMENT

    pipeline = load_pipeline(path)
    experiments = [s.experiment for s in pipeline.stages if isinstance(s, RunStage)]
    return Payload(
        name=pipeline.name,
        summary=f"{len(pipeline.stages)} stage(s), {sum(len(e.expand()) for e in experiments)} variant(s)",
        experiments=experiments,
        tracking_uri=pipeline.tracking_uri,
        tracking=True,
        yaml_text=yaml.safe_dump(pipeline.self_contained(), sort_keys=False, allow_unicode=True),
        command=["pipeline", "run"],
        extra_args=list(extra_args),
        mlflow_experiment=EXPERIMENT.format(name=pipeline.name),
    )


def project_folder(working_dir: Path | None) -> Path:
    """The folder to upload: ``working_dir`` (it must be a folder), else the current one."""
    if working_dir is not None and not Path(working_dir).is_dir():
        raise SubmitError(f"--working-dir {working_dir} is not a folder", 2)
    return (working_dir or Path.cwd()).resolve()

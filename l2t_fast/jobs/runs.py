"""Where a transfer job's files go, so that nothing is overwritten silently:

    OUTPUT_DIR/<YYYYmmdd-HHMMSS>/        one job; ``l2t-fast transfer`` makes a fresh one
        job.json                         its config, written before anything runs
        results.json                     strict JSON, rewritten after every finished run
        results.png
        checkpoints/<method>-seed<seed>.pt   (and .previous.pt: the one before)
        models/<method>-seed<seed>.pt        the trained network, for ``load_model``
    OUTPUT_DIR/latest -> <YYYYmmdd-HHMMSS>   the newest job

A folder holds one job: running another config into it is refused (naming the keys that
differ), and resuming may only extend the job (more methods, more seeds).
"""
import json
import os
import time

from l2t_fast import checkpoint

JOB_FILE = "job.json"
# Keys a resumed job may change: it then runs the new (method, seed) pairs too.
EXTENDABLE = ("methods", "seeds")
# Keys a resumed job may change because no result depends on them.
RESULT_NEUTRAL = ("workers",)


def new_run_folder(output_dir):
    """A fresh, empty job folder ``output_dir/<date-time>`` (a suffix keeps two jobs started
    in the same second apart), with ``output_dir/latest`` pointing at it."""
    os.makedirs(output_dir, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        name = stamp if attempt == 0 else f"{stamp}-{attempt + 1}"
        folder = os.path.join(output_dir, name)
        try:
            os.mkdir(folder)
        except FileExistsError:
            continue
        link = os.path.join(output_dir, "latest")
        temporary = os.path.join(output_dir, f".latest-{os.getpid()}")
        if os.path.lexists(temporary):
            os.unlink(temporary)
        os.symlink(name, temporary)
        os.replace(temporary, link)
        return folder
    raise ValueError(f"cannot make a new job folder in {output_dir!r}")


def folder_to_resume(output_dir, run=None):
    """The job folder ``--resume`` continues: ``run`` if given, else ``output_dir/latest``."""
    folder = run or os.path.join(output_dir, "latest")
    if not os.path.isfile(os.path.join(folder, JOB_FILE)):
        what = "is not a job folder" if os.path.isdir(folder) else "does not exist"
        raise ValueError(f"nothing to resume: {folder!r} {what} (no {JOB_FILE}); run without "
                         f"--resume to start a job, or give the job folder to --resume")
    return os.path.realpath(folder)


def differing_keys(a, b, ignore=()):
    return sorted(k for k in set(a) | set(b) if k not in ignore and a.get(k) != b.get(k))


def claim(folder, config, resume):
    """Make ``folder`` this job's (writing ``job.json``), or check that it is: a folder of
    another job is refused unless ``resume``, and then its config may differ from ``config``
    only in ``EXTENDABLE`` and ``RESULT_NEUTRAL`` keys. Also proves the folder writable
    before anything runs."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot make the folder {folder!r}: {error}") from None
    path = os.path.join(folder, JOB_FILE)
    if os.path.exists(path):
        with open(path) as file:
            earlier = json.load(file)["config"]
        if not resume:
            raise ValueError(f"{folder!r} holds another job (its {JOB_FILE}); give a new "
                             f"folder, or resume=True (--resume) to continue that job")
        differ = differing_keys(earlier, config, ignore=EXTENDABLE + RESULT_NEUTRAL)
        if differ:
            raise ValueError(f"cannot resume the job in {folder!r}: it was made with a "
                             f"different config (keys {differ} differ; only "
                             f"{', '.join(EXTENDABLE)} may change to extend it)")
    elif any(name.endswith(".pt") for name in os.listdir(folder)):
        raise ValueError(f"{folder!r} already holds checkpoints but no {JOB_FILE} (another "
                         f"job's, or an older version's); give a new folder")
    try:
        write_json(path, {"config": config})
    except OSError as error:
        raise ValueError(f"cannot write into {folder!r}: {error}") from None


def write_json(path, data):
    """Strict JSON (non-finite floats become null), written atomically."""
    text = json.dumps(finite(data), indent=2, allow_nan=False)
    temporary = f"{path}.partial"
    with open(temporary, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def finite(value):
    """``value`` with every non-finite float (NaN, inf) replaced by None."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


# ---- trained networks -----------------------------------------------------------------------

def _model_path(folder, method, seed):
    return os.path.join(folder, "models", f"{method}-seed{seed}.pt")


def save_model(folder, method, seed, model, config, num_classes):
    """Keep a run's trained network: its weights and the architecture they fit (the
    target's or the source's, whichever ``model`` is; a network of neither, such as a
    progressive network's two columns, is not kept)."""
    from l2t_fast.models import build_model

    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    image_size = config["image_size"]
    for role in ("target_model", "source_model"):
        reference = build_model(config[role], num_classes, image_size=image_size).state_dict()
        if reference.keys() == state.keys() and all(
                reference[k].shape == state[k].shape for k in state):
            checkpoint.save_atomic({"architecture": config[role], "num_classes": num_classes,
                                    "image_size": image_size, "method": method, "seed": seed,
                                    "state_dict": state},
                                   _model_path(folder, method, seed))
            return True
    return False


def load_model(folder, method, seed):
    """The trained network of run (``method``, ``seed``) in job folder ``folder``, in eval
    mode on the CPU; a ValueError if that run kept none."""
    from l2t_fast.models import build_model

    path = _model_path(folder, method, seed)
    if not os.path.isfile(path):
        raise ValueError(f"job {folder!r} has no trained network of {method} seed {seed} "
                         f"({path} is missing: the run did not finish, or its network is "
                         f"not one architecture)")
    saved = checkpoint.load(path, "trained network", "run the job again")
    model = build_model(saved["architecture"], saved["num_classes"],
                        image_size=saved.get("image_size"))
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def load_results(folder):
    """The results.json of job folder ``folder``."""
    path = os.path.join(folder, "results.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder!r} has no results.json: is it a job folder of "
                         f"`l2t-fast transfer`?")
    with open(path) as file:
        return json.load(file)


def load_source(folder):
    """The source network of the job in ``folder``, rebuilt the way the job got it (from
    the cache or the user's file it used, or the library's pretrained weights it named), in
    eval mode on the CPU."""
    from l2t_fast.jobs.source import load_source as load_source_file
    from l2t_fast.models import build_model

    results = load_results(folder)
    config, source = results["config"], results["source"]
    if source.get("path") is None and config.get("source_weights") is not None:
        model = build_model(config["source_model"], None, weights=config["source_weights"],
                            image_size=config["image_size"])
        return model.eval().requires_grad_(False)
    model, _ = load_source_file({**config, "source_checkpoint": source["path"]}, "cpu")
    return model

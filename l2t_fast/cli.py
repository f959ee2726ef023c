"""The ``l2t-fast`` command: ``transfer`` (the comparison job) and ``sweep`` (Ray Tune).

Every ``transfer`` option is a key of ``l2t_fast.transfer.DEFAULT_CONFIG`` (dashes for
underscores) and takes its default from there, so the command line and the Python API
cannot drift apart.
"""
import argparse
import sys

from l2t_fast.methods import METHODS

HELP = {
    "data": "'digits' (embedded: source digits 0-4, target 5-9), an image folder "
            "(CLASS/*.png, or train/ and test/ with CLASS/ inside), or a torchvision data "
            "set name such as CIFAR10 (needs torchvision and --data-root)",
    "data_root": "folder a torchvision data set was downloaded to",
    "image_size": "images are resized to this square size",
    "source_model": "resnet8, resnet14, resnet20, torchvision:NAME or timm:NAME",
    "target_model": "resnet8, resnet14, resnet20, torchvision:NAME or timm:NAME",
    "source_checkpoint": "state_dict file of the source model (needed unless --data digits)",
    "source_epochs": "epochs to pretrain the source on the data's source task (then cached)",
    "cache_dir": "where pretrained sources are cached (default ~/.cache/l2t_fast)",
    "source_layers": "source module names to match (default: the model's stages)",
    "target_layers": "target module names to match (default: the model's stages)",
    "pairs": "'all', or pairs SOURCE:TARGET of layer indices, e.g. 0:0 1:1 2:2",
    "methods": f"methods to compare, from: {' '.join(METHODS)}",
    "seeds": "seeds; each draws its own labelled images and initialisation",
    "labels_per_class": "labelled target training images per class (0: all)",
    "epochs": "training epochs over the labelled target images",
    "batch_size": "training batch size",
    "lr": "SGD learning rate (cosine-annealed over the epochs)",
    "momentum": "SGD momentum",
    "weight_decay": "SGD weight decay",
    "beta": "weight of the feature-matching loss (fm, l2t-w, l2t-ww)",
    "inner_steps": "T: lookahead steps on the matching loss in the meta step (l2t-w, l2t-ww)",
    "meta_lr": "Adam learning rate of the What/Where networks",
    "freeze_stages": "finetune: keep the first k stages of the source frozen",
    "lwf_temperature": "LwF distillation temperature",
    "at_beta": "attention-transfer loss weight",
    "augment_shift": "random translation augmentation, in pixels (0: none)",
    "device": "auto, cpu, cuda, cuda:N",
    "backend": "feature-matching backend: auto, reference, cpu, cuda, triton",
}
LISTS = {"source_layers": str, "target_layers": str, "methods": str, "seeds": int,
         "pairs": str}


def _pair(text):
    if text == "all":
        return text
    try:
        source, target = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"pair {text!r} must be SOURCE:TARGET layer indices, e.g. 0:1, or 'all'") from None
    return [source, target]


def _method(text):
    if text not in METHODS:
        raise argparse.ArgumentTypeError(f"unknown method {text!r}; choose from "
                                         f"{', '.join(METHODS)}")
    return text


def add_transfer_arguments(parser):
    from l2t_fast.transfer import DEFAULT_CONFIG

    for key, default in DEFAULT_CONFIG.items():
        option = "--" + key.replace("_", "-")
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        kwargs = {"default": default, "help": f"{HELP[key]} (default: {shown})"}
        if key in LISTS:
            kwargs.update(nargs="+", type={"pairs": _pair, "methods": _method}.get(key, LISTS[key]))
        elif isinstance(default, bool):
            raise AssertionError(f"no boolean options expected, got {key}")
        elif isinstance(default, (int, float)):
            kwargs["type"] = type(default)
        parser.add_argument(option, **kwargs)
    parser.add_argument("--output-dir", default="l2t_fast_results",
                        help="where results.json and results.png go (default: l2t_fast_results)")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="checkpoint every run here after every epoch")
    parser.add_argument("--resume", action="store_true",
                        help="continue from --checkpoint-dir: finished runs are reused")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _transfer(args):
    from l2t_fast import report
    from l2t_fast.transfer import DEFAULT_CONFIG, run_transfer

    config = {key: getattr(args, key) for key in DEFAULT_CONFIG}
    pairs = config["pairs"]
    if isinstance(pairs, list) and "all" in pairs:
        if len(pairs) > 1:
            raise ValueError("--pairs: 'all' cannot be combined with explicit pairs")
        config["pairs"] = "all"
    results = run_transfer(config, output_dir=args.output_dir,
                           checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                           progress=not args.quiet)
    source = results["source"]
    if "test_accuracy" in source:
        print(f"source {source['model']}: {100 * source['test_accuracy']:.2f}% on held-out "
              f"source images ({'cached' if source['cached'] else 'pretrained now'})")
    print(report.format_table(results["summary"]))
    print(f"total {results['seconds']:.1f} s; results in {args.output_dir}/results.json "
          f"and results.png")
    return 0


def build_parser(with_sweep=False):
    """The argument parser; ``with_sweep`` imports ``l2t_fast.sweep`` (and Ray) to add the
    sweep options, which only the ``sweep`` command needs."""
    parser = argparse.ArgumentParser(
        prog="l2t-fast", description="Learning What and Where to Transfer (L2T-ww), fast.")
    commands = parser.add_subparsers(dest="command", required=True)
    transfer = commands.add_parser(
        "transfer", help="compare transfer methods on a few-label target task",
        description="Train scratch, finetune, lwf, at, fm, l2t-w and l2t-ww on the target task "
                    "for several seeds and compare test accuracies. With no options: the "
                    "embedded digits demo (a few minutes on 2 CPU cores).")
    add_transfer_arguments(transfer)
    transfer.set_defaults(handler=_transfer)
    sweep = commands.add_parser("sweep", help="hyperparameter sweep of the transfer job "
                                              "(Ray Tune)")
    if with_sweep:
        from l2t_fast import sweep as sweep_module

        sweep_module.add_arguments(sweep)
        sweep.set_defaults(handler=sweep_module.main)
    return parser


def main(argv=None):
    """Entry point of ``l2t-fast`` and ``python -m l2t_fast``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(with_sweep=argv[:1] == ["sweep"])
    args = parser.parse_args(argv)
    try:
        return args.handler(args) or 0
    except ValueError as error:
        parser.exit(2, f"l2t-fast {args.command}: error: {error}\n")

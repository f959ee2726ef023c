"""``l2t-fast pretrain``: train a source network on a data set and save it in the format
that ``--source-checkpoint`` reads, so that an image folder (which has no source task of its
own) can have a source: ``l2t-fast pretrain --data SOURCE_FOLDER --model M --output s.pt``,
then ``l2t-fast transfer --data TARGET_FOLDER --source-model M --source-checkpoint s.pt``.

It trains on the data's training split (the embedded digits: their source task), with SGD,
cosine-annealed by epoch, and the data's augmentation (random shifts of the digits; random
resized crops and flips of image folders, which stream from disk); it reports top-1
accuracy on the test split (the digits: a held-out fifth of the source task). The file holds
``{"model": state_dict, "info": {...}}``, written atomically.
"""
import os
import time

import torch

from l2t_fast import checkpoint
from l2t_fast.data import TransferData, load_data, stratified_mask
from l2t_fast.jobs import options
from l2t_fast.methods.base import evaluate
from l2t_fast.models import build_model, pretrained_statistics


def pretrain_source(data, model_name, output, *, data_root=None, image_size=32,
                    weights=None, epochs=30, batch_size=64, lr=0.1, momentum=0.9,
                    weight_decay=1e-4, augment_shift=4, device="cpu", seed=0, workers="auto",
                    progress=False):
    """Train ``model_name`` on data set ``data`` (as ``l2t-fast transfer --data`` takes it),
    from ``weights`` if given (fine-tuning), save it to ``output``; returns its info dict
    (``model``, ``data``, ``num_classes``, ``epochs``, ``test_accuracy``, ``seconds``)."""
    from tqdm.auto import tqdm

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an int >= 2, got {batch_size!r}")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.access(folder, os.W_OK):
        raise ValueError(f"output {output!r}: cannot write to folder {folder!r}")
    device = torch.device(device)
    statistics = pretrained_statistics(model_name, weights) if data != "digits" else None
    loaded = _training_data(load_data(data, data_root, image_size, statistics=statistics,
                                      workers=workers)).to(device)
    classes = loaded.num_classes
    checkpoint.seed_everything(seed)
    if weights is None:
        model = build_model(model_name, classes, image_size=image_size)
    else:
        model = build_model(model_name, classes, weights=weights, image_size=image_size)
    model.to(device)
    everything = torch.arange(len(loaded.pool_labels))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                                weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    images = 0
    with tqdm(range(epochs), desc=f"pretraining {model_name}", unit="epoch",
              disable=not progress) as bar:
        for _ in bar:
            model.train()
            for x, y in loaded.labelled_batches(everything, batch_size, generator,
                                                augment_shift):
                optimizer.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
                images += len(x)
            scheduler.step()
            bar.set_postfix(images_per_s=f"{images / (time.perf_counter() - started):.1f}")
    info = {"model": model_name, "data": data, "num_classes": classes, "epochs": epochs,
            "image_size": image_size, "weights": weights,
            "test_accuracy": evaluate(model, loaded.test_batches()),
            "seconds": time.perf_counter() - started}
    checkpoint.save_atomic({"model": model.cpu().state_dict(), "info": info}, output)
    return info


def _training_data(data):
    """What ``load_data`` gave, as the data to train on: a data set's pool and test split,
    or the digits' source task with a fixed fifth held out."""
    if not data.has_source_task:
        return data
    held_out = stratified_mask(data.source_labels, 0.2, seed=0)
    return TransferData(data.name, data.source_images[~held_out], data.source_labels[~held_out],
                        data.source_images[held_out], data.source_labels[held_out],
                        data.num_source_classes)


def _workers(word):
    return options.OrAuto(options.Int(0)).coerce(word)


def add_arguments(parser):
    parser.description = ("Train a source network on a data set and save it for "
                          "`l2t-fast transfer --source-checkpoint`.")
    parser.add_argument("--data", required=True,
                        help="an image folder (CLASS/*.jpg, or train/ and test/ or val/ with "
                             "CLASS/ inside), a torchvision data set name (with --data-root), "
                             "or 'digits' (their source task)")
    parser.add_argument("--data-root", default=None, help="where a torchvision data set is")
    parser.add_argument("--model", required=True,
                        help="resnet8, resnet14, resnet20, torchvision:NAME or timm:NAME")
    parser.add_argument("--weights", default=None,
                        help="start from these pretrained weights (torchvision weight names, "
                             "timm tags); default: random initialisation")
    parser.add_argument("--output", required=True, help="the checkpoint file to write")
    parser.add_argument("--image-size", type=int, default=32, help="square image size (32)")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (30)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (64)")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (0.1)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (0.9)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay (1e-4)")
    parser.add_argument("--augment-shift", type=int, default=4,
                        help="random translation of the digits in pixels (4; 0: none; "
                             "image folders get random resized crops and flips)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--workers", type=_workers, default="auto",
                        help="DataLoader processes that decode an image folder (auto: "
                             "min(4, CPU count); 0: in this process)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args):
    import sys

    from l2t_fast.jobs.transfer import _device

    device = _device(args.device)  # a device that cannot work fails before any training
    info = pretrain_source(args.data, args.model, args.output, data_root=args.data_root,
                           image_size=args.image_size, weights=args.weights,
                           epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                           momentum=args.momentum, weight_decay=args.weight_decay,
                           augment_shift=args.augment_shift, device=device, seed=args.seed,
                           workers=args.workers,
                           progress=not args.quiet and sys.stderr.isatty())
    print(f"{info['model']} on {info['data']} ({info['num_classes']} classes, "
          f"{info['epochs']} epochs, {info['seconds']:.1f} s): "
          f"{100 * info['test_accuracy']:.2f}% on its test split; saved to {args.output}")
    print(f"use it: l2t-fast transfer --source-model {info['model']} --source-checkpoint "
          f"{args.output} --image-size {info['image_size']} ...")
    return 0

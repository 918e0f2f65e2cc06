"""Writes a grid of samples of a config's data set, with labels (docs/data.md).

    python -m experiments.show_data --config configs/distorted_mnist.py:rts,st_cnn,affine \\
        --config.data.source=../shared/data/mnist --out docs/images/data_rts.png
    python -m experiments.show_data --config configs/mnist_addition.py --split test --out addition.png

2-D images are shown in grey with their label; addition pairs as a colour
composite (first digit red, second green) titled ``a+b=sum``; 3-D volumes as
two maximum-intensity projections side by side (along depth: the digit as a
2-D transformer would see it; along height: its depth extent);
co-localisation images with the digit's frame box (red) and ink box (green);
RGB images (synthetic house numbers, CUB) in colour with their label. For real
SVHN (``configs/svhn.py`` without ``synthetic``) it draws ``--cols`` house
numbers of the ``--config.data.source`` folder with their digit boxes above
their 64 px and 128 px crops:

    python -m experiments.show_data --config configs/svhn.py:cnn,64 \\
        --config.data.source=../shared/data/svhn_format1_subset --out crops.png
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from absl import flags
from ml_collections import config_flags

from experiments.figures import save_small_png

config_flags.DEFINE_config_file("config", None, "Experiment config file (path.py[:args]).", lock_config=False,
                                accept_new_attributes=True)  # data keys are checked by the task registry
flags.DEFINE_string("out", None, "PNG file to write.")
flags.DEFINE_enum("split", "train", ["train", "test"],
                  "Training batch (of --step) or the fixed test set's first examples.")
flags.DEFINE_integer("step", 0, "Training step whose batch is shown (--split=train).")
flags.DEFINE_integer("rows", 8, "Grid rows.")
flags.DEFINE_integer("cols", 8, "Grid columns.")
flags.DEFINE_float("scale", 1.0, "Figure size multiplier.")
flags.mark_flags_as_required(["config", "out"])
FLAGS = flags.FLAGS


def sample_batch(config, split: str, step: int, count: int) -> dict:
    """``count`` examples of the config's data: training batch ``step`` or the test set's first ones."""
    from stn_jax.paper.data import make_dataset

    data = config.data.to_dict()
    if split == "test":
        # A test set smaller than the split is a class-balanced subset: these are its first `count` examples.
        size = data.get("test_size", -1)
        data["test_size"] = count if size == -1 else min(count, size)
    dataset = make_dataset(data, seed=config.get("seed", 0), global_batch_size=count, cache_dir=None)
    if split == "test":
        return dataset.generate_test_set(with_params=True), dataset
    return dataset.train_batch(step, with_params=True), dataset


def _panel(batch: dict, i: int, task: str) -> tuple[np.ndarray, str]:
    image = np.asarray(batch["image"][i])
    if np.ndim(batch["label"][i]):  # house numbers: five positions, 10 = no digit
        from stn_jax.paper.data.svhn import decode_label

        return image, decode_label(batch["label"][i])
    label = int(batch["label"][i])
    if image.shape[-1] == 3:
        return image, str(label)
    if task == "addition":
        a, b = (int(v) for v in batch["params"]["labels"][i])
        rgb = np.zeros(image.shape[:2] + (3,), np.float32)
        rgb[..., 0], rgb[..., 1] = image[..., 0], image[..., 1]
        return rgb, f"{a}+{b}={label}"
    if task == "mnist3d":
        vol = image[..., 0]  # (D, H, W)
        front = vol.max(axis=0)  # along depth: (H, W)
        top = vol.max(axis=1)  # along height: (D, W)
        gap = np.ones((front.shape[0], 2), np.float32) * 0.5
        return np.concatenate([front, gap, top], axis=1), str(label)
    return image[..., 0], str(label)


def render(batch: dict, task: str, rows: int, cols: int, title: str, out: Path, scale: float = 1.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = min(rows * cols, len(batch["label"]))
    wide = 2.0 if task == "mnist3d" else 1.0
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.05 * wide * scale, rows * 1.15 * scale + 0.4),
                             squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if k >= n:
            continue
        panel, text = _panel(batch, k, task)
        ax.imshow(panel, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(text, fontsize=8, pad=2)
        if task == "coloc":
            size = panel.shape[0]
            for key, colour in (("box", "red"), ("ink_box", "lime")):
                x0, y0, x1, y1 = ((np.asarray(batch[key][k]) + 1) * size - 1) / 2  # normalised -> pixel
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=0.8))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97), pad=0.2, h_pad=0.2, w_pad=0.1)
    save_small_png(fig, out)


def real_house_numbers(source: str, out: Path, count: int) -> Path:
    """Real SVHN images with their digit boxes above their 64 px and 128 px crops, from the first split
    of ``source`` that is there (no cache is built)."""
    from stn_jax.paper.data import svhn

    for split in ("train", "test", "extra"):
        try:
            located = svhn.locate_split(source, split)
        except svhn.SvhnSourceError:
            continue
        if located.kind == "folder":
            return svhn.draw_crops(located.path, out, count=count)
    return svhn.draw_crops(svhn.locate_split(source, "train").path, out, count=count)  # raises naming the paths


def main(argv) -> None:
    del argv
    config = FLAGS.config
    count = FLAGS.rows * FLAGS.cols
    if config.data.task == "svhn":
        print(f"wrote {real_house_numbers(config.data.source, Path(FLAGS.out), FLAGS.cols)}")
        return
    batch, dataset = sample_batch(config, FLAGS.split, FLAGS.step, count)
    p = dataset.params
    shape = "x".join(str(s) for s in dataset.image_shape)
    where = f"train step {FLAGS.step}" if FLAGS.split == "train" else "test set"
    title = f"task {dataset.task}: {shape}, {where}"
    if dataset.task == "mnist3d":
        title += " (max along depth | along height)" + (", rotated" if p["rotate_3d"] else "")
    if dataset.task in ("tc", "coloc"):
        title += f", {p['num_clutter']} clutter {p['clutter_size']}x{p['clutter_size']}"
    render(batch, dataset.task, FLAGS.rows, FLAGS.cols, title, Path(FLAGS.out), FLAGS.scale)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    from experiments.cli import run  # one-line errors for bad config arguments and overrides

    run(main)

"""Where a trained CUB transformer model looks: how far its crops moved from where they started, and a picture.

    python -m experiments.cub_crops --workdir workdirs/cub30/<run>

Reads the run's ``config.json`` and newest checkpoint, computes the attention
parameters ``(scale, tx, ty)`` of every transformer on every test image, and
prints one JSON line: per transformer, its initial centre (the localisation
network's starting bias, `stn_jax.paper.models.cub.INITIAL_CENTRES`), the mean
learned centre and the mean ``|t - t0|`` (Euclidean, in normalised image
coordinates: 1 is half the image side) over the test set. It also writes
``crops.json`` and ``images/crops_test.png`` (test birds with the initial crops
dashed and the learned ones solid) into the workdir. The paper's head / body
split (Fig. 3) is a learned result only where the crops moved.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from absl import flags

from experiments.cli import run

flags.DEFINE_string("workdir", None, "A CUB transformer run's directory (config.json and checkpoints).")
flags.DEFINE_integer("pictures", 8, "Test images in the picture.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS

COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:orange")


def crop_parameters(workdir: Path) -> tuple[np.ndarray, np.ndarray, object]:
    """``theta (N_transformers, N_test, 3)`` of the newest checkpoint, the test images' indices, the data set."""
    from stn_jax.paper.checkpoints import checkpoint_manager, restore_latest
    from stn_jax.paper.evaluation import open_run
    from stn_jax.paper.workdir import read_config

    config = read_config(workdir)
    if not config.model.name.startswith("cub_st"):
        raise ValueError(f"{workdir} holds a {config.model.name} run; crops exist for cub_st2 / cub_st4 runs only")
    r = open_run(config, workdir)
    state = restore_latest(r, checkpoint_manager(workdir, config.keep_checkpoints, create=False), r.setup.state)
    ds = r.setup.dataset
    thetas = []
    for start in range(0, ds.test_size, config.eval_batch_size):
        idx = np.arange(start, min(start + config.eval_batch_size, ds.test_size))
        theta, _ = r.picture_step(state.params, state.model_state, ds.test_examples(idx)["image"])
        thetas.append(np.stack([np.asarray(t) for t in theta]))
    return np.concatenate(thetas, axis=1), np.arange(ds.test_size), ds


def summarise(theta: np.ndarray) -> dict:
    """Per transformer: initial centre, mean learned centre, mean ``|t - t0|`` and its spread over images."""
    from stn_jax.paper.models.cub import INITIAL_CENTRES

    start = np.asarray(INITIAL_CENTRES[theta.shape[0]])
    shift = np.linalg.norm(theta[:, :, 1:] - start[:, None], axis=-1)  # (N_transformers, N_test)
    return {"initial_centre": start.round(4).tolist(), "mean_centre": theta[:, :, 1:].mean(1).round(4).tolist(),
            "mean_abs_shift": shift.mean(1).round(4).tolist(), "std_abs_shift": shift.std(1).round(4).tolist(),
            "centre_std_over_images": theta[:, :, 1:].std(1).mean(-1).round(4).tolist()}


def draw(theta: np.ndarray, ds, count: int, path: Path) -> None:
    """Test birds with each transformer's initial (dashed) and learned (solid) crop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stn_jax.paper.models.cub import INITIAL_CENTRES

    count = min(count, theta.shape[1])
    images = ds.test_examples(np.arange(count))["image"]
    start = INITIAL_CENTRES[theta.shape[0]]
    fig, axes = plt.subplots(1, count, figsize=(2.2 * count, 2.4))
    for i, ax in enumerate(np.atleast_1d(axes)):
        size = images[i].shape[0]
        ax.imshow(images[i])
        for k in range(theta.shape[0]):
            scale = theta[k, i, 0]
            for (cx, cy), style in ((start[k], "--"), (theta[k, i, 1:], "-")):
                x0, y0 = ((cx - scale) + 1) * size / 2, ((cy - scale) + 1) * size / 2
                ax.add_patch(plt.Rectangle((x0, y0), scale * size, scale * size, fill=False, ls=style, lw=1.5,
                                           color=COLOURS[k % len(COLOURS)]))
        ax.set_axis_off()
    fig.suptitle("crops on test birds: initial (dashed) and learned (solid), one colour per transformer", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv) -> None:
    del argv
    workdir = Path(FLAGS.workdir).expanduser().absolute()
    theta, _, ds = crop_parameters(workdir)
    summary = summarise(theta)
    (workdir / "crops.json").write_text(json.dumps(summary, indent=2) + "\n")
    draw(theta, ds, FLAGS.pictures, workdir / "images" / "crops_test.png")
    print(json.dumps(summary))


if __name__ == "__main__":
    run(main)
